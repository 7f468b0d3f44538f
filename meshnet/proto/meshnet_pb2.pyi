from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LinkBatch(_message.Message):
    __slots__ = ("links",)
    LINKS_FIELD_NUMBER: _ClassVar[int]
    links: _containers.RepeatedCompositeFieldContainer[LinkRequest]
    def __init__(self, links: _Optional[_Iterable[_Union[LinkRequest, _Mapping]]] = ...) -> None: ...

class BatchReply(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[LinkReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[LinkReply, _Mapping]]] = ...) -> None: ...

class LinkRequest(_message.Message):
    __slots__ = ("namespace", "pod", "peer_pod", "uid", "vni", "local_intf", "peer_intf", "local_ip", "peer_ip", "peer_vtep")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    PEER_POD_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    VNI_FIELD_NUMBER: _ClassVar[int]
    LOCAL_INTF_FIELD_NUMBER: _ClassVar[int]
    PEER_INTF_FIELD_NUMBER: _ClassVar[int]
    LOCAL_IP_FIELD_NUMBER: _ClassVar[int]
    PEER_IP_FIELD_NUMBER: _ClassVar[int]
    PEER_VTEP_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pod: str
    peer_pod: str
    uid: int
    vni: int
    local_intf: str
    peer_intf: str
    local_ip: str
    peer_ip: str
    peer_vtep: str
    def __init__(self, namespace: _Optional[str] = ..., pod: _Optional[str] = ..., peer_pod: _Optional[str] = ..., uid: _Optional[int] = ..., vni: _Optional[int] = ..., local_intf: _Optional[str] = ..., peer_intf: _Optional[str] = ..., local_ip: _Optional[str] = ..., peer_ip: _Optional[str] = ..., peer_vtep: _Optional[str] = ...) -> None: ...

class LinkReply(_message.Message):
    __slots__ = ("action", "message")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    action: str
    message: str
    def __init__(self, action: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
