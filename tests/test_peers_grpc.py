"""The gRPC edge between daemons, over a real gRPC server on 127.0.0.1 with a fake core behind it;
with mutual TLS, certificates made in a tmp dir by the installer's own code (meshnet.pki)."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from meshnet import pki
from meshnet.daemon.config import TlsPaths
from meshnet.daemon.node import NodeDaemon
from meshnet.daemon.peer_auth import Caller, FarPod, Kind, authorize_batch
from meshnet.daemon.peer_client import PEER_BATCH_MAX, PeerError, PeerLink
from meshnet.daemon.peer_service import PeerDenied
from meshnet.daemon.peers import GrpcPeerClient, serve, to_message
from meshnet.executor import ExecError
from meshnet.proto import meshnet_pb2, meshnet_pb2_grpc

# Every field set to something distinctive, the integers near their limits.
LINK = PeerLink(namespace="lab-ns", pod="r1", peer_pod="r2-0", uid=2**31 + 7, vni=16_777_215,
                local_intf="eth12", peer_intf="Ethernet3", local_ip="2001:db8::1/64", peer_ip="2001:db8::2/64",
                peer_vtep="198.51.100.7")


@dataclass
class FakeCore:
    """Answers like `NodeDaemon.peer_update/peer_remove`; the pod name picks the behaviour."""

    received: list[tuple[str, PeerLink]] = field(default_factory=list)
    callers: list[Caller] = field(default_factory=list)
    # When set, the real rule (peer_auth) decides against these far pods, as the core does.
    far_pods: dict[str, FarPod] | None = None

    def _authorize(self, kind: Kind, links: Sequence[PeerLink], caller: Caller) -> None:
        self.callers.append(caller)
        if self.far_pods is not None:
            verdict = authorize_batch(kind, caller, links, lambda _ns, pod: (self.far_pods or {}).get(pod))
            if not verdict.allowed:
                raise PeerDenied(verdict.reason)

    def _answer(self, what: str, link: PeerLink, action: str) -> str:
        self.received.append((what, link))
        if link.pod == "forged":
            raise PeerDenied(f"no Topology {link.namespace}/{link.pod}")
        if link.pod == "broken":
            raise ExecError("RTNETLINK answers: Operation not permitted")
        return action

    def peer_update(self, links: Sequence[PeerLink], caller: Caller) -> list[str]:
        self._authorize("update", links, caller)
        return [self._answer("update", link, "created") for link in links]

    def peer_remove(self, links: Sequence[PeerLink], caller: Caller) -> list[str]:
        self._authorize("remove", links, caller)
        return [self._answer("remove", link, "removed") for link in links]


@dataclass
class Edge:
    core: FakeCore
    client: GrpcPeerClient
    address: str
    logs: list[dict[str, Any]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def edge() -> Iterator[Edge]:
    core = FakeCore()
    logs: list[dict[str, Any]] = []
    port = free_port()
    server = serve(cast(NodeDaemon, core), "127.0.0.1", port, lambda **event: logs.append(event))
    client = GrpcPeerClient(timeout=10)
    try:
        yield Edge(core, client, f"127.0.0.1:{port}", logs)
    finally:
        client.close()
        server.stop(grace=None).wait()


def test_update_round_trips_every_field(edge: Edge) -> None:
    assert edge.client.update(edge.address, LINK) == "created"
    assert edge.core.received == [("update", LINK)]
    # Without TLS the core learns only where the call came from.
    assert edge.core.callers == [Caller(address="127.0.0.1")]
    assert [e["event"] for e in edge.logs] == ["peer-update"]


def test_remove_round_trips_every_field(edge: Edge) -> None:
    assert edge.client.remove(edge.address, LINK) == "removed"
    assert edge.core.received == [("remove", LINK)]


def test_empty_addresses_survive_the_wire(edge: Edge) -> None:
    bare = PeerLink("default", "a", "b", 0, 0, "eth1", "eth1", "", "", "198.51.100.2")
    edge.client.update(edge.address, bare)
    assert edge.core.received == [("update", bare)]


@pytest.mark.parametrize("method", ["update", "remove"])
def test_permission_denied_becomes_peer_error(edge: Edge, method: str) -> None:
    forged = PeerLink(**{**LINK.__dict__, "pod": "forged"})
    with pytest.raises(PeerError, match=r"PERMISSION_DENIED: no Topology lab-ns/forged") as info:
        getattr(edge.client, method)(edge.address, forged)
    assert edge.address in str(info.value)
    assert not info.value.unreachable  # an answer: the caller may call again at once
    assert [e["event"] for e in edge.logs] == [f"peer-{method}-denied"]


def test_plumbing_failure_becomes_internal(edge: Edge) -> None:
    broken = PeerLink(**{**LINK.__dict__, "pod": "broken"})
    with pytest.raises(PeerError, match="INTERNAL: RTNETLINK answers: Operation not permitted"):
        edge.client.update(edge.address, broken)


def test_unreachable_peer_is_a_peer_error() -> None:
    client = GrpcPeerClient(timeout=0.3)
    try:
        with pytest.raises(PeerError, match=r"DEADLINE_EXCEEDED|UNAVAILABLE") as info:
            client.update(f"127.0.0.1:{free_port()}", LINK)
        assert info.value.unreachable  # the caller fails further calls at once within its back-off
    finally:
        client.close()


@pytest.mark.parametrize("method", ["update_many", "remove_many"])
def test_a_batch_beyond_the_bound_is_refused_before_the_core_sees_it(edge: Edge, method: str) -> None:
    links = [dataclasses.replace(LINK, uid=uid) for uid in range(PEER_BATCH_MAX + 1)]
    with pytest.raises(PeerError, match=f"INVALID_ARGUMENT: {PEER_BATCH_MAX + 1} links in one call: at most") as info:
        getattr(edge.client, method)(edge.address, links)
    assert not info.value.unreachable
    assert edge.core.received == [] and edge.core.callers == []
    assert len(getattr(edge.client, method)(edge.address, links[:PEER_BATCH_MAX])) == PEER_BATCH_MAX


def test_one_channel_per_peer_address(edge: Edge) -> None:
    for _ in range(3):
        edge.client.update(edge.address, LINK)
    assert len(edge.client._channels) == 1


def test_a_batch_round_trips_in_order(edge: Edge) -> None:
    """One call carries every link towards a node; replies come back in the request's order."""
    links = [dataclasses.replace(LINK, uid=uid) for uid in (3, 1, 2)]
    assert edge.client.update_many(edge.address, links) == ["created"] * 3
    assert [lk.uid for _, lk in edge.core.received] == [3, 1, 2]


def test_one_forged_link_refuses_the_whole_batch(edge: Edge) -> None:
    forged = dataclasses.replace(LINK, pod="forged")
    with pytest.raises(PeerError, match="PERMISSION_DENIED"):
        edge.client.update_many(edge.address, [LINK, forged])


# --- mutual TLS ------------------------------------------------------------------------------------

# r2-0, the far pod of LINK, lives on node-b; the server is node-a. Both dial and serve on loopback.
# A refused handshake: the client (wait_for_ready) tries again until its deadline, then gives up.
REFUSED = r"UNAVAILABLE|DEADLINE_EXCEEDED"
FAR = {"r2-0": FarPod("r2-0", True, "node-b", "198.51.100.7")}


def tls(directory: Path, node: str) -> TlsPaths:
    return TlsPaths(str(directory / pki.CA_CERT), str(pki.node_cert(directory, node)),
                    str(pki.node_key(directory, node)))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster's CA with nodes a, b and c; and a second CA that also made a node-b."""
    d = tmp_path_factory.mktemp("pki")
    assert pki.ensure(d, {"node-a": ["127.0.0.1"], "node-b": ["127.0.0.1"], "node-c": ["127.0.0.1"]}) == [
        "ca.crt", "node-a.crt", "node-b.crt", "node-c.crt"]
    assert pki.ensure(d, {"node-a": ["127.0.0.1"]}) == []  # kept: nothing made twice
    assert (d / pki.CA_KEY).stat().st_mode & 0o077 == 0 and (d / "node-a.key").stat().st_mode & 0o077 == 0
    pki.ensure(d / "other", {"node-b": ["127.0.0.1"]})
    return d


@pytest.fixture
def tls_edge(certs: Path) -> Iterator[Edge]:
    core = FakeCore(far_pods=dict(FAR))
    logs: list[dict[str, Any]] = []
    port = free_port()
    server = serve(cast(NodeDaemon, core), "127.0.0.1", port, lambda **event: logs.append(event), tls(certs, "node-a"))
    try:
        yield Edge(core, GrpcPeerClient(timeout=3), f"127.0.0.1:{port}", logs)
    finally:
        server.stop(grace=None).wait()


def call(client: GrpcPeerClient, method: str, address: str, link: PeerLink) -> str:
    try:
        return str(getattr(client, method)(address, link))
    finally:
        client.close()


def test_tls_the_far_pods_node_is_accepted_by_its_certificate(tls_edge: Edge, certs: Path) -> None:
    assert call(GrpcPeerClient(timeout=5, tls=tls(certs, "node-b")), "update", tls_edge.address, LINK) == "created"
    assert tls_edge.core.callers == [Caller(node="node-b", address="127.0.0.1")]
    assert tls_edge.logs[-1]["caller"] == "node node-b"


def test_tls_a_client_without_a_certificate_never_reaches_the_core(tls_edge: Edge, certs: Path) -> None:
    with pytest.raises(PeerError, match=REFUSED):
        call(GrpcPeerClient(timeout=3), "update", tls_edge.address, LINK)  # plain gRPC
    # TLS that trusts the server but presents no certificate of its own.
    channel = grpc.secure_channel(tls_edge.address, grpc.ssl_channel_credentials((certs / pki.CA_CERT).read_bytes()))
    try:
        with pytest.raises(grpc.RpcError) as err:
            meshnet_pb2_grpc.PeerStub(channel).Update(meshnet_pb2.LinkBatch(links=[to_message(LINK)]), timeout=3)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        channel.close()
    assert tls_edge.core.callers == [] and tls_edge.core.received == []


def test_tls_a_certificate_of_another_ca_is_refused(tls_edge: Edge, certs: Path) -> None:
    other = TlsPaths(str(certs / "ca.crt"), str(certs / "other" / "node-b.crt"), str(certs / "other" / "node-b.key"))
    with pytest.raises(PeerError, match=REFUSED):
        call(GrpcPeerClient(timeout=3, tls=other), "update", tls_edge.address, LINK)
    assert tls_edge.core.callers == []


def test_tls_a_server_of_another_ca_is_not_trusted(certs: Path) -> None:
    """The client checks the server too: a daemon of another CA answering on the peer's address."""
    core = FakeCore()
    port = free_port()
    server = serve(cast(NodeDaemon, core), "127.0.0.1", port, lambda **_: None,
                   TlsPaths(str(certs / "ca.crt"), str(certs / "other" / "node-b.crt"),
                            str(certs / "other" / "node-b.key")))
    try:
        with pytest.raises(PeerError, match=REFUSED):
            call(GrpcPeerClient(timeout=3, tls=tls(certs, "node-b")), "update", f"127.0.0.1:{port}", LINK)
    finally:
        server.stop(grace=None).wait()
    assert core.received == []


def test_tls_the_certificate_of_the_wrong_node_is_refused(tls_edge: Edge, certs: Path) -> None:
    """node-c has a good certificate, but r2-0 is node-b's pod: node-c may not speak for it."""
    with pytest.raises(PeerError, match=r"PERMISSION_DENIED: .*caller is node node-c, but pod r2-0 is on node node-b"):
        call(GrpcPeerClient(timeout=5, tls=tls(certs, "node-c")), "update", tls_edge.address, LINK)
    assert tls_edge.core.received == []
    assert tls_edge.logs[-1]["event"] == "peer-update-denied" and tls_edge.logs[-1]["caller"] == "node node-c"


def test_tls_remove_of_a_live_link_is_refused(tls_edge: Edge, certs: Path) -> None:
    link = PeerLink(**{**LINK.__dict__, "peer_vtep": FAR["r2-0"].src_ip})
    with pytest.raises(PeerError, match=r"PERMISSION_DENIED: .*its link is live"):
        call(GrpcPeerClient(timeout=5, tls=tls(certs, "node-b")), "remove", tls_edge.address, link)
    assert tls_edge.core.received == []
    # Once the store shows r2-0 gone, the same request goes through.
    assert tls_edge.core.far_pods is not None
    tls_edge.core.far_pods["r2-0"] = FarPod("r2-0", False, "", "")
    assert call(GrpcPeerClient(timeout=5, tls=tls(certs, "node-b")), "remove", tls_edge.address, link) == "removed"


def test_missing_certificate_files_are_named(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(PeerError, match=f"TLS CA {tmp_path}/ca.crt: No such file"):
        GrpcPeerClient(tls=TlsPaths(str(tmp_path / "ca.crt"), str(tmp_path / "n.crt"), str(tmp_path / "nope.key")))
    with pytest.raises(PeerError, match=f"TLS key {tmp_path}/nope.key"):
        GrpcPeerClient(tls=TlsPaths(str(certs / "ca.crt"), str(certs / "node-a.crt"), str(tmp_path / "nope.key")))
    with pytest.raises(PeerError, match=f"TLS key {tmp_path}/nope.key"):
        serve(cast(NodeDaemon, FakeCore()), "127.0.0.1", free_port(), lambda **_: None,
              TlsPaths(str(certs / "ca.crt"), str(certs / "node-a.crt"), str(tmp_path / "nope.key")))


# --- where the port listens ----------------------------------------------------------------------

def listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (this namespace's /proc/net/tcp{,6})."""
    found = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                raw = bytes.fromhex(host)
                if name == "tcp":
                    found.add(str(ipaddress.IPv4Address(raw[::-1])))
                else:
                    ip6 = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                    found.add(str(ip6.ipv4_mapped or ip6))  # gRPC may bind IPv4 on a dual-stack socket
    return found


def test_server_listens_only_on_the_address_it_is_given(edge: Edge) -> None:
    port = int(edge.address.rsplit(":", 1)[1])
    assert listening(port) == {"127.0.0.1"}


def test_second_server_on_the_same_address_fails(edge: Edge) -> None:
    """grpc's Python server sets SO_REUSEPORT unless told not to: two daemons for one node would
    then both listen on the port and share the peers' calls (issue 13)."""
    port = int(edge.address.rsplit(":", 1)[1])
    with pytest.raises(PeerError, match=f"gRPC cannot listen on 127.0.0.1:{port}"):
        serve(cast(NodeDaemon, FakeCore()), "127.0.0.1", port, lambda **_: None)
    # The first one still answers.
    assert edge.client.update(edge.address, LINK) == "created"
