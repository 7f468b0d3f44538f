"""The gRPC edge between daemons: the Peer servicer (refuses what the store does not back) and client.

With TLS configured both ends present a certificate of the cluster's CA (meshnet.pki) and the
servicer hands the core the caller's node name from it; without TLS, only the caller's address.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc

from meshnet import naming
from meshnet.daemon import memory
from meshnet.daemon.config import TlsPaths
from meshnet.daemon.node import NodeDaemon
from meshnet.daemon.peer_auth import Caller, parse_peer
from meshnet.daemon.peer_client import PEER_BATCH_MAX, PeerError, PeerLink
from meshnet.daemon.peer_service import PeerDenied
from meshnet.executor import ExecError
from meshnet.proto import meshnet_pb2, meshnet_pb2_grpc


def to_message(link: PeerLink) -> meshnet_pb2.LinkRequest:
    return meshnet_pb2.LinkRequest(
        namespace=link.namespace, pod=link.pod, peer_pod=link.peer_pod, uid=link.uid, vni=link.vni,
        local_intf=link.local_intf, peer_intf=link.peer_intf, local_ip=link.local_ip, peer_ip=link.peer_ip,
        peer_vtep=link.peer_vtep)


def from_message(msg: meshnet_pb2.LinkRequest) -> PeerLink:
    return PeerLink(msg.namespace, msg.pod, msg.peer_pod, int(msg.uid), int(msg.vni), msg.local_intf,
                    msg.peer_intf, msg.local_ip, msg.peer_ip, msg.peer_vtep)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PeerError(f"TLS {what} {path}: {e.strerror or e}") from e


def server_credentials(tls: TlsPaths) -> grpc.ServerCredentials:
    """Clients must present a certificate of our CA: an unauthenticated one never reaches a handler."""
    return grpc.ssl_server_credentials([(_read(tls.key, "key"), _read(tls.cert, "certificate"))],
                                       root_certificates=_read(tls.ca, "CA"), require_client_auth=True)


def channel_credentials(tls: TlsPaths) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(_read(tls.ca, "CA"), _read(tls.key, "key"), _read(tls.cert, "certificate"))


def caller_of(context: grpc.ServicerContext) -> Caller:
    """Who sent the request: the node named by its verified certificate (exactly one DNS
    subjectAltName, a valid node name: anything else names nobody), and the address it came from."""
    address = parse_peer(context.peer())
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return Caller(address=address)
    names = auth.get("peer_dns") or []
    node = names[0].decode(errors="replace") if len(names) == 1 else ""
    if not node or naming.k8s_name_problem(node):
        return Caller()  # TLS without a usable identity: refused by every rule
    return Caller(node=node, address=address)


class PeerServicer(meshnet_pb2_grpc.PeerServicer):
    def __init__(self, core: NodeDaemon, log: Callable[..., None]) -> None:
        self.core = core
        self.log = log

    def _serve(self, fn: Callable[[Sequence[PeerLink], Caller], list[str]], request: meshnet_pb2.LinkBatch,
               context: grpc.ServicerContext, what: str) -> meshnet_pb2.BatchReply:
        caller = caller_of(context)
        if len(request.links) > PEER_BATCH_MAX:  # bounded work per call: callers send pages
            self.log(event=f"peer-{what}-denied", caller=str(caller), links=len(request.links), reason="too many links")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{len(request.links)} links in one call: at most {PEER_BATCH_MAX} (send pages)")
        links = [from_message(m) for m in request.links]
        pods = sorted({f"{lk.namespace}/{lk.pod}" for lk in links})
        try:
            actions = fn(links, caller)
        except PeerDenied as e:
            self.log(event=f"peer-{what}-denied", caller=str(caller), pods=pods, reason=str(e))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except ExecError as e:
            self.log(event=f"peer-{what}-failed", pods=pods, error=str(e))
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:
            # A page of far ends (its kernel view, plans, batch) is freed now: the next page, served
            # on another thread of the pool, does not start from a heap grown by this one.
            memory.trim_soon()
        self.log(event=f"peer-{what}", caller=str(caller), pods=pods, links=len(links),
                 changed=sum(a not in ("unchanged", "absent") for a in actions))
        return meshnet_pb2.BatchReply(replies=[meshnet_pb2.LinkReply(action=a) for a in actions])

    def Update(self, request: meshnet_pb2.LinkBatch, context: grpc.ServicerContext) -> meshnet_pb2.BatchReply:
        return self._serve(self.core.peer_update, request, context, "update")

    def Remove(self, request: meshnet_pb2.LinkBatch, context: grpc.ServicerContext) -> meshnet_pb2.BatchReply:
        return self._serve(self.core.peer_remove, request, context, "remove")


def serve(core: NodeDaemon, bind: str, port: int, log: Callable[..., None], tls: TlsPaths | None = None) -> grpc.Server:
    """Serve on `bind` (an address, never every address without TLS: see config.WILDCARD_BINDS)."""
    credentials = server_credentials(tls) if tls is not None else None  # unreadable files: no server at all
    # grpc's Python server sets SO_REUSEPORT by default: a second daemon for the same node would then
    # bind the same port and the kernel would share the peers' calls between the two (issue 13).
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc"),
                         options=[("grpc.so_reuseport", 0)])
    meshnet_pb2_grpc.add_PeerServicer_to_server(PeerServicer(core, log), server)
    address = naming.host_port(bind, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as e:  # grpcio raises where older versions returned 0
        raise PeerError(f"gRPC cannot listen on {address}: {e}") from e
    if not bound:
        raise PeerError(f"gRPC cannot listen on {address}")
    server.start()
    return server


CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


# No answer at all: the caller fails further calls to that peer at once for its back-off
# (peer_client.PeerBackoff); any other code is an answer.
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class GrpcPeerClient:
    """Channels are kept per peer address: an ADD to a busy node should not pay a TCP handshake."""

    # Short: a peer daemon that is down builds its own end from the store when it is back (its
    # start-up pass), so waiting long only holds up the caller's ADD. The deadline of a call grows
    # with its links (`per_link`): a page of 32 links gets 0.64 s more, a full page
    # (peer_client.PEER_PAGE_LINKS, one pod's links) 10 s more.
    def __init__(self, timeout: float = 5.0, tls: TlsPaths | None = None, per_link: float = 0.02) -> None:
        self.timeout = timeout
        self.per_link = per_link
        # Read once: a rotated certificate is picked up by restarting the daemon (docs/security.md).
        self._credentials = channel_credentials(tls) if tls is not None else None
        self._stubs: dict[str, meshnet_pb2_grpc.PeerStub] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def _stub(self, address: str) -> meshnet_pb2_grpc.PeerStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                # gRPC's default reconnect back-off (1 s growing ×1.6 to 120 s) kept a restarted
                # peer daemon unreachable for seconds after it was back; peers are on the node
                # network, so reconnecting fast and often costs next to nothing.
                # With TLS the peer is dialled by its VTEP address, which its certificate names
                # (an IP subjectAltName): reaching another node's daemon there fails the handshake.
                channel = (grpc.insecure_channel(address, options=CHANNEL_OPTIONS) if self._credentials is None
                           else grpc.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS))
                self._channels.append(channel)
                stub = self._stubs[address] = meshnet_pb2_grpc.PeerStub(channel)
            return stub

    def _call(self, method: str, address: str, links: Sequence[PeerLink]) -> list[str]:
        batch = meshnet_pb2.LinkBatch(links=[to_message(lk) for lk in links])
        try:
            reply = getattr(self._stub(address), method)(batch, timeout=self.timeout + self.per_link * len(links),
                                                         wait_for_ready=True)
        except grpc.RpcError as e:
            raise PeerError(f"{address}: {e.code().name}: {e.details()}", unreachable=e.code() in UNREACHABLE) from e
        return [str(r.action) for r in reply.replies]

    def update_many(self, address: str, links: Sequence[PeerLink]) -> list[str]:
        return self._call("Update", address, links)

    def remove_many(self, address: str, links: Sequence[PeerLink]) -> list[str]:
        return self._call("Remove", address, links)

    def update(self, address: str, link: PeerLink) -> str:
        return self.update_many(address, [link])[0]

    def remove(self, address: str, link: PeerLink) -> str:
        return self.remove_many(address, [link])[0]

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
