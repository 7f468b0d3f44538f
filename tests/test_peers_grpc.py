"""The gRPC edge between daemons, over a real gRPC server on 127.0.0.1 with a fake core behind it."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from meshnet.daemon.node import NodeDaemon
from meshnet.daemon.peer_client import PeerError, PeerLink
from meshnet.daemon.peer_service import PeerDenied
from meshnet.daemon.peers import GrpcPeerClient, serve
from meshnet.executor import ExecError

# Every field set to something distinctive, the integers near their limits.
LINK = PeerLink(namespace="lab-ns", pod="r1", peer_pod="r2-0", uid=2**31 + 7, vni=16_777_215,
                local_intf="eth12", peer_intf="Ethernet3", local_ip="2001:db8::1/64", peer_ip="2001:db8::2/64",
                peer_vtep="198.51.100.7")


@dataclass
class FakeCore:
    """Answers like `NodeDaemon.peer_update/peer_remove`; the pod name picks the behaviour."""

    received: list[tuple[str, PeerLink]] = field(default_factory=list)

    def _answer(self, what: str, link: PeerLink, action: str) -> str:
        self.received.append((what, link))
        if link.pod == "forged":
            raise PeerDenied(f"no Topology {link.namespace}/{link.pod}")
        if link.pod == "broken":
            raise ExecError("RTNETLINK answers: Operation not permitted")
        return action

    def peer_update(self, links: Sequence[PeerLink]) -> list[str]:
        return [self._answer("update", link, "created") for link in links]

    def peer_remove(self, links: Sequence[PeerLink]) -> list[str]:
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
    assert [e["event"] for e in edge.logs] == [f"peer-{method}-denied"]


def test_plumbing_failure_becomes_internal(edge: Edge) -> None:
    broken = PeerLink(**{**LINK.__dict__, "pod": "broken"})
    with pytest.raises(PeerError, match="INTERNAL: RTNETLINK answers: Operation not permitted"):
        edge.client.update(edge.address, broken)


def test_unreachable_peer_is_a_peer_error() -> None:
    client = GrpcPeerClient(timeout=0.3)
    try:
        with pytest.raises(PeerError, match=r"DEADLINE_EXCEEDED|UNAVAILABLE"):
            client.update(f"127.0.0.1:{free_port()}", LINK)
    finally:
        client.close()


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
