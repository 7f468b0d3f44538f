from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

DESCRIPTOR: _descriptor.FileDescriptor

class LinkRequest(_message.Message):
    __slots__ = ("local_intf", "local_ip", "namespace", "peer_intf", "peer_ip", "peer_pod", "peer_vtep", "pod", "uid", "vni")
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
    def __init__(self, namespace: str | None = ..., pod: str | None = ..., peer_pod: str | None = ..., uid: int | None = ..., vni: int | None = ..., local_intf: str | None = ..., peer_intf: str | None = ..., local_ip: str | None = ..., peer_ip: str | None = ..., peer_vtep: str | None = ...) -> None: ...

class LinkReply(_message.Message):
    __slots__ = ("action", "message")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    action: str
    message: str
    def __init__(self, action: str | None = ..., message: str | None = ...) -> None: ...
