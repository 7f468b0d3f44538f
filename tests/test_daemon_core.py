"""meshnetd's logic (`NodeDaemon`) without root: a real sqlite store, a dry-run executor whose kernel
look-ups (`ip -j ... show`) are answered by pytest-subprocess, runtime namespaces that exist only
on paper, and a fake peer client recording what would go over gRPC."""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from pytest_subprocess import FakeProcess

from meshnet import naming
from meshnet.cni import protocol
from meshnet.cni.protocol import CniError
from meshnet.daemon import netns, sandboxes
from meshnet.daemon.config import DEFAULT_GRPC_PORT as GRPC_PORT
from meshnet.daemon.node import NodeDaemon
from meshnet.daemon.peer_auth import Caller
from meshnet.daemon.peer_client import PeerError, PeerLink
from meshnet.daemon.peer_service import PeerDenied
from meshnet.executor import ExecError, Executor
from meshnet.model import Link, Topology, TopologyStatus, parse_manifest
from meshnet.plan import NodeInfo
from meshnet.store.base import Store
from meshnet.store.sqlite import SqliteStore
from tests.kubeapi.server import KubeApiServer

NODE0 = NodeInfo("node0", "198.51.100.1", "eth0", None)
VTEP1, VTEP2 = "198.51.100.2", "198.51.100.3"
# In-process peer requests name their sender like the gRPC edge does: the node of the far pod (c).
TRUSTED = Caller(node="node1")
NS = "default"

# a: veth to b (same node), vxlan to c (node1), macvlan on the node's eth0, link to d (never alive).
MANIFEST = """
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: a}
spec:
  links:
  - {uid: 1, peer_pod: b, local_intf: eth1, peer_intf: eth1, local_ip: 10.0.1.1/24, peer_ip: 10.0.1.2/24}
  - {uid: 2, peer_pod: c, local_intf: eth2, peer_intf: eth5, local_ip: 10.0.2.1/24, peer_ip: 10.0.2.3/24}
  - {uid: 3, peer_pod: localhost, local_intf: eth3, peer_intf: eth0, local_ip: 10.0.3.1/24}
  - {uid: 4, peer_pod: d, local_intf: eth4, peer_intf: eth1}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: b}
spec:
  links:
  - {uid: 1, peer_pod: a, local_intf: eth1, peer_intf: eth1, local_ip: 10.0.1.2/24, peer_ip: 10.0.1.1/24}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: c}
spec:
  links:
  - {uid: 2, peer_pod: a, local_intf: eth5, peer_intf: eth2, local_ip: 10.0.2.3/24, peer_ip: 10.0.2.1/24}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: d}
spec:
  links:
  - {uid: 4, peer_pod: a, local_intf: eth1, peer_intf: eth4}
"""


@dataclass
class FakePeers:
    """The gRPC edge: records (method, address, PeerLink) per link and each batch's size (one batch
    per peer node); `fail` makes every call raise PeerError."""

    calls: list[tuple[str, str, PeerLink]] = field(default_factory=list)
    batches: list[tuple[str, str, int]] = field(default_factory=list)
    fail: bool = False

    def update_many(self, address: str, links: Sequence[PeerLink]) -> list[str]:
        self.batches.append(("update", address, len(links)))
        self.calls.extend(("update", address, link) for link in links)
        if self.fail:
            raise PeerError(f"{address}: UNAVAILABLE: connection refused")
        return ["created"] * len(links)

    def remove_many(self, address: str, links: Sequence[PeerLink]) -> list[str]:
        self.batches.append(("remove", address, len(links)))
        self.calls.extend(("remove", address, link) for link in links)
        return ["removed"] * len(links)


class PaperNetns:
    """Runtime namespace paths /var/run/netns/<name> that "exist" without root."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def make(self, name: str) -> str:
        path = f"/var/run/netns/{name}"
        self.paths.add(path)
        return path

    def resolve(self, path: str) -> str:
        if path not in self.paths:
            raise netns.NetnsError(f"network namespace {path} does not exist")
        return Path(path).name

    def exists(self, path: str) -> bool:
        return path in self.paths


@pytest.fixture
def paper(monkeypatch: pytest.MonkeyPatch) -> PaperNetns:
    fake = PaperNetns()
    monkeypatch.setattr(netns, "resolve", fake.resolve)
    monkeypatch.setattr(netns, "exists", fake.exists)
    monkeypatch.setattr(netns, "detach", lambda _name: None)
    # Paper namespaces are network namespaces of their own, each with its own inode.
    monkeypatch.setattr(sandboxes, "netns_problem",
                        lambda path: None if path in fake.paths else f"{path}: No such file or directory")

    def ino(path: str) -> int:
        if path not in fake.paths:
            raise FileNotFoundError(path)
        return zlib.crc32(path.encode()) + 1

    monkeypatch.setattr(sandboxes, "_ns_ino", ino)
    return fake


@pytest.fixture
def kernel(fp: FakeProcess) -> FakeProcess:
    """Every `ip` look-up answers "no interfaces"; dry-run never runs `ip -batch` at all."""
    fp.register([fp.program("ip"), fp.any()], stdout="[]")
    fp.keep_last_process(True)
    return fp


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "store.db")
    for t in parse_manifest(MANIFEST).topologies:
        s.apply(t)
    yield s
    s.close()


@dataclass
class Node:
    core: NodeDaemon
    executor: Executor
    peers: FakePeers


def make_node(store: Store) -> Node:
    executor = Executor(dry_run=True)
    peers = FakePeers()
    core = NodeDaemon(NODE0, store, executor, peers, grpc_port=GRPC_PORT)
    return Node(core, executor, peers)


@pytest.fixture
def node(store: SqliteStore, paper: PaperNetns, kernel: FakeProcess) -> Iterator[Node]:
    n = make_node(store)
    yield n
    n.core.close()


def set_alive(store: Store, pod: str, node: str, vtep: str, net_ns: str, container: str = "c0",
              here: NodeDaemon | None = None) -> None:
    """`here`: the pod's daemon, which records the sandbox as its ADD would have (store alone is not enough)."""
    if here is not None:
        here.state.sandboxes.put((NS, pod), container, net_ns)
    store.update_status(NS, pod, lambda cur: TopologyStatus(src_ip=vtep, net_ns=net_ns, container_id=container,
                                                            node=node))


def cni(core: NodeDaemon, command: str, pod: str, netns_path: str, container: str,
        version: str = "1.0.0") -> dict[str, Any] | None:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns_path, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NS};K8S_POD_NAME={pod}"}
    # meshnet chained after the plugin that made eth0 (the delegate mode is the root tests' part)
    eth0_ip: dict[str, Any] = {"address": "203.0.113.5/24", "interface": 0}
    if version == "0.4.0":
        eth0_ip["version"] = "4"
    prev = {"cniVersion": version, "interfaces": [{"name": "eth0", "sandbox": netns_path}], "ips": [eth0_ip]}
    conf = {"cniVersion": version, "name": "meshnet", "type": "meshnet", "prevResult": prev}
    return core.handle(command, env, json.dumps(conf))


def lines(node: Node) -> list[str]:
    return [c.shell() for c in node.executor.recorded]


def get(store: Store, pod: str) -> Topology:
    t = store.get(NS, pod)
    assert t is not None
    return t


def mac(pod: str, intf: str) -> str:
    return naming.mac_address(NS, pod, intf)


def test_add_sends_every_planned_link_to_the_executor(node: Node, store: SqliteStore, paper: PaperNetns) -> None:
    set_alive(store, "b", "node0", NODE0.vtep_ip, paper.make("pb"), here=node.core)
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    result = cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    vni = naming.vni(NS, 2)
    grp = naming.LINK_GROUP
    assert sorted(lines(node)) == sorted([
        f"ip link add eth1 address {mac('a', 'eth1')} mtu 1500 group {grp} netns pa type veth peer name eth1 "
        f"address {mac('b', 'eth1')} mtu 1500 group {grp} netns pb",
        "ip -n pa addr add 10.0.1.1/24 dev eth1", "ip -n pa link set eth1 up",
        "ip -n pb addr add 10.0.1.2/24 dev eth1", "ip -n pb link set eth1 up",
        f"ip link add eth2 address {mac('a', 'eth2')} mtu 1450 group {grp} netns pa type vxlan id {vni} "
        f"remote {VTEP1} local {NODE0.vtep_ip} dstport 4789 dev eth0",
        "ip -n pa addr add 10.0.2.1/24 dev eth2", "ip -n pa link set eth2 up",
        f"ip link add eth3 address {mac('a', 'eth3')} group {grp} link eth0 netns pa type macvlan mode bridge",
        "ip -n pa addr add 10.0.3.1/24 dev eth3", "ip -n pa link set eth3 up",
    ]), "uid 4's peer d is not alive: nothing may be built for it"
    assert result is not None
    assert [i["name"] for i in result["interfaces"]] == ["eth0", "eth1", "eth2", "eth3"]
    assert all(i["sandbox"] == "/var/run/netns/pa" for i in result["interfaces"])
    # The MACs meshnet set, so runtimes that read them (podman) get them without another ip call.
    assert [i.get("mac") for i in result["interfaces"][1:]] == [mac("a", f"eth{k}") for k in (1, 2, 3)]
    assert {ip["address"]: ip["interface"] for ip in result["ips"]} == {
        "203.0.113.5/24": 0, "10.0.1.1/24": 1, "10.0.2.1/24": 2, "10.0.3.1/24": 3}
    st = get(store, "a").status
    assert (st.container_id, st.node, st.src_ip, st.net_ns) == ("cid-a", "node0", NODE0.vtep_ip, "/var/run/netns/pa")
    assert [(s.pod_name, s.link_id) for s in st.skipped] == [("d", 4)]
    assert {s.uid: s.state for s in st.links} == {1: "up", 2: "up", 3: "up", 4: "pending"}


def test_an_add_plans_again_only_when_a_pending_peer_came_alive_meanwhile(
        node: Node, store: SqliteStore, paper: PaperNetns, monkeypatch: pytest.MonkeyPatch) -> None:
    """After its one status write an ADD looks again at the peers its plan left pending: planned
    again only if one of them can be linked now (1500 veths planned twice was CPU for nothing)."""
    from meshnet.daemon import cni_verbs

    planned: list[str] = []
    real = cni_verbs.plan_pod
    monkeypatch.setattr(cni_verbs, "plan_pod", lambda topo, *a: planned.append(topo.name) or real(topo, *a))
    set_alive(store, "b", "node0", NODE0.vtep_ip, paper.make("pb"), here=node.core)
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    assert planned == ["a"]  # d stayed down: its link is pending, nothing new to plan
    assert {s.uid: s.state for s in get(store, "a").status.links}[4] == "pending"
    # d comes alive on another node between the ADD's plan and its catch-up with its own write.
    catch_up = node.core.state.catch_up

    def d_comes_alive(topo: Topology) -> None:
        set_alive(store, "d", "node1", VTEP1, paper.make("pd"))
        catch_up(topo)

    monkeypatch.setattr(node.core.state, "catch_up", d_comes_alive)
    planned.clear()
    cni(node.core, "ADD", "a", paper.make("pa2"), "cid-a2")
    assert planned == ["a", "a"]


def test_veth_built_by_the_second_add_is_up_in_the_first_pods_status(node: Node, store: SqliteStore,
                                                                      paper: PaperNetns) -> None:
    cni(node.core, "ADD", "b", paper.make("pb"), "cid-b")
    st = get(store, "b").status
    assert ({s.uid: s.state for s in st.links}, [s.link_id for s in st.skipped]) == ({1: "pending"}, [1])
    cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    st = get(store, "b").status
    assert ({s.uid: s.state for s in st.links}, st.skipped) == ({1: "up"}, ())
    assert st.container_id == "cid-b"


def test_remote_end_asks_the_peers_node_with_the_link_seen_from_there(node: Node, store: SqliteStore,
                                                                      paper: PaperNetns) -> None:
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    assert node.peers.calls == [("update", f"{VTEP1}:{GRPC_PORT}", PeerLink(
        namespace=NS, pod="c", peer_pod="a", uid=2, vni=naming.vni(NS, 2), local_intf="eth5", peer_intf="eth2",
        local_ip="10.0.2.3/24", peer_ip="10.0.2.1/24", peer_vtep=NODE0.vtep_ip))]


def test_peers_not_alive_are_pending_and_nobody_is_called(node: Node, store: SqliteStore, paper: PaperNetns) -> None:
    result = cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    assert node.peers.calls == []
    assert result is not None and [i["name"] for i in result["interfaces"]] == ["eth0", "eth3"]  # + the macvlan
    assert sorted(s.pod_name for s in get(store, "a").status.skipped) == ["b", "c", "d"]


def test_a_failing_peer_is_recorded_and_the_add_still_succeeds(node: Node, store: SqliteStore,
                                                                paper: PaperNetns) -> None:
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    node.peers.fail = True
    result = cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    assert result is not None and "eth2" in [i["name"] for i in result["interfaces"]]
    st = get(store, "a").status
    assert {s.uid: s.state for s in st.links}[2] == "error"
    assert "uid 2" in st.plumbing_error and "UNAVAILABLE" in st.plumbing_error


def test_reconcile_asks_the_peer_again_before_calling_a_failed_link_up(node: Node, store: SqliteStore,
                                                                       paper: PaperNetns) -> None:
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    node.peers.fail = True
    cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    updates = len(node.peers.calls)
    node.core.reconcile()  # the peer failed just now: left alone for a while, the link stays in error
    assert len(node.peers.calls) == updates
    assert {s.uid: s.state for s in get(store, "a").status.links}[2] == "error"

    peer = f"{VTEP1}:{GRPC_PORT}"
    assert node.core.take_retries() == set()  # not before its back-off is over
    node.core.peer_client.backoff.back(peer)  # e.g. a status its daemon wrote: it may be asked again
    assert node.core.take_retries() == {(NS, "a")}
    node.core.reconcile()  # it still fails
    assert len(node.peers.calls) == updates + 1
    assert {s.uid: s.state for s in get(store, "a").status.links}[2] == "error"

    assert node.core.take_retries() == set()  # failed again: backing off longer
    node.peers.fail = False  # its daemon is back: asked again, it builds its end
    node.core.peer_client.backoff.back(peer)
    node.core.reconcile(node.core.take_retries())
    assert node.peers.calls[-1][:2] == ("update", f"{VTEP1}:{GRPC_PORT}") and node.peers.calls[-1][2].uid == 2
    st = get(store, "a").status
    assert {s.uid: s.state for s in st.links}[2] == "up" and st.plumbing_error == ""
    calls = len(node.peers.calls)
    node.core.reconcile()  # up: nobody is asked again
    assert len(node.peers.calls) == calls and node.core.take_retries() == set()


def test_peer_backoff_doubles_up_to_a_minute_and_news_of_the_peer_ends_it() -> None:
    from meshnet.daemon.peer_client import PeerBackoff

    now = [100.0]
    b = PeerBackoff(clock=lambda: now[0], rand=lambda: 0.0)  # no jitter (tests/test_peer_paging.py)

    def waits(address: str, n: int, step: float, **kw: bool) -> list[float]:
        out = []
        for _ in range(n):
            b.failed(address, **kw)
            start = now[0]
            while not b.due(address):
                now[0] += step
            out.append(round(now[0] - start, 3))
        return out

    assert b.due("p:1")
    assert waits("p:1", 6, 1.0, unreachable=True) == [5, 10, 20, 40, 60, 60]
    # A peer that answered with an error is working: its first wait is short, then the same doubling.
    assert waits("a:1", 9, 0.25) == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    b.failed("p:1")
    assert not b.due("p:1") and b.due("other:1")
    b.back("p:1")
    assert b.due("p:1")
    b.failed("p:1")  # the count goes on: news of the peer is not an answer from it
    assert not b.due("p:1")
    b.succeeded("p:1")
    assert waits("p:1", 1, 1.0, unreachable=True) == [5]
    b.succeeded("p:1")
    assert waits("p:1", 1, 0.25) == [0.5]


def test_pod_without_topology_gets_exactly_the_eth0_result(node: Node, paper: PaperNetns) -> None:
    result = cni(node.core, "ADD", "nobody", paper.make("pn"), "cid-n", version="0.4.0")
    assert result == {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/pn"}],
                      "ips": [{"version": "4", "address": "203.0.113.5/24", "interface": 0}], "dns": {}}
    assert node.executor.recorded == [] and node.peers.calls == []


# --- peer_update: what the store does not back is refused, and nothing happens -------------------

def valid_update() -> PeerLink:
    """What node1's daemon sends when c (on node1) links to a (alive here)."""
    return PeerLink(NS, "a", "c", 2, naming.vni(NS, 2), "eth2", "eth5", "10.0.2.1/24", "10.0.2.3/24", VTEP1)


@pytest.fixture
def a_and_c_alive(node: Node, store: SqliteStore, paper: PaperNetns) -> Node:
    set_alive(store, "a", "node0", NODE0.vtep_ip, paper.make("pa"), "cid-a", here=node.core)
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"), "cid-c")
    return node


def test_peer_update_backed_by_the_store_builds_our_end(a_and_c_alive: Node) -> None:
    node = a_and_c_alive
    assert node.core.peer_update([valid_update()], TRUSTED) == ["created"]
    vni = naming.vni(NS, 2)
    assert lines(node) == [
        f"ip link add eth2 address {mac('a', 'eth2')} mtu 1450 group {naming.LINK_GROUP} netns pa type vxlan "
        f"id {vni} remote {VTEP1} local {NODE0.vtep_ip} dstport 4789 dev eth0",
        "ip -n pa addr add 10.0.2.1/24 dev eth2", "ip -n pa link set eth2 up"]


def test_peer_update_wants_the_vni_of_the_block_both_pods_recorded(a_and_c_alive: Node,
                                                                   store: SqliteStore) -> None:
    node = a_and_c_alive
    for pod, block in (("a", 7), ("c", 5)):
        store.update_status(NS, pod, lambda cur, b=block: replace(cur.status, vni_block=b))
    with pytest.raises(PeerDenied, match=rf"VNI {naming.vni(NS, 2, 7)} is not the link's .*block 5"):
        node.core.peer_update([replace(valid_update(), vni=naming.vni(NS, 2, 7))], TRUSTED)
    assert lines(node) == []
    assert node.core.peer_update([replace(valid_update(), vni=naming.vni(NS, 2, 5))], TRUSTED) == ["created"]
    assert f"type vxlan id {5 * naming.VNI_BLOCK_SIZE + 2} " in lines(node)[0]


def test_add_records_the_namespace_block_and_a_free_one_when_another_namespace_has_it(
        node: Node, store: SqliteStore, paper: PaperNetns) -> None:
    home = naming.vni_block(NS)
    other = next(f"o{i}" for i in range(100_000) if naming.vni_block(f"o{i}") == home)
    store.apply(Topology("x", other, (Link(1, "y", "eth1", "eth1"),)))
    store.update_status(other, "x", lambda cur: replace(cur.status, vni_block=home))
    node.core.reconcile()  # the daemon's view of every Topology (the watch keeps it current)
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    a = store.get(NS, "a")
    assert a is not None and a.status.vni_block == home + 1  # the home block was another's first
    assert f"type vxlan id {naming.vni(NS, 2, home + 1)} " in " ".join(lines(node))
    # The next pod of the namespace adopts the block its namespace recorded.
    cni(node.core, "ADD", "b", paper.make("pb"), "cid-b")
    b = store.get(NS, "b")
    assert b is not None and b.status.vni_block == home + 1


def test_an_add_meeting_a_vni_clash_moves_when_a_smaller_namespace_has_the_block(
        node: Node, store: SqliteStore, paper: PaperNetns, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both namespaces picked block 640 at the same instant; the kernel refuses our vxlan. The
    ADD waits, sees the other's record, and (its name being larger) moves to the next block."""
    home = naming.vni_block(NS)
    other = "a3699"
    assert naming.vni_block(other) == home and other < NS
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    builds: list[list[int]] = []
    real_build = node.core.cni.build

    def build(namespace: str, plans: Sequence[Any]) -> None:
        builds.append([p.vni for p in plans if hasattr(p, "vni")])
        if len(builds) == 1:  # the other namespace's record lands just as the kernel refuses ours
            store.apply(Topology("x", other, (Link(1, "y", "eth1", "eth1"),)))
            store.update_status(other, "x", lambda cur: replace(cur.status, vni_block=home))
            node.core.reconcile(only=())  # what the watch does: the daemon now knows it
            raise ExecError("Error: A VXLAN device with the specified VNI already exists.")
        # Meanwhile our block was recorded (not alive yet), so the other namespace's daemon sees
        # both records too: were its name the larger, it would move.
        recorded = get(store, "a").status
        assert (recorded.vni_block, recorded.container_id, recorded.alive) == (home, "cid-a", False)
        real_build(namespace, plans)

    monkeypatch.setattr(node.core.cni, "build", build)
    monkeypatch.setattr("meshnet.daemon.vni.VNI_CLASH_PAUSES", (0.01,))
    cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    a = store.get(NS, "a")
    assert a is not None and a.status.vni_block == home + 1 and a.status.alive
    assert builds == [[naming.vni(NS, 2, home)], [naming.vni(NS, 2, home + 1)]]
    assert node.peers.calls[-1][2].vni == naming.vni(NS, 2, home + 1)


def test_an_add_meeting_a_clash_it_cannot_settle_fails_after_waiting(
        node: Node, store: SqliteStore, paper: PaperNetns, monkeypatch: pytest.MonkeyPatch) -> None:
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    tries: list[int] = []

    def build(namespace: str, plans: Sequence[Any]) -> None:
        tries.append(1)
        raise ExecError("Error: A VXLAN device with the specified VNI already exists.")

    monkeypatch.setattr(node.core.cni, "build", build)
    monkeypatch.setattr("meshnet.daemon.vni.VNI_CLASH_PAUSES", (0.01, 0.01))
    with pytest.raises(CniError, match="VNI already exists") as err:
        cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    assert err.value.code == protocol.LINK_PLUMBING_FAILED and len(tries) == 3
    a = store.get(NS, "a")
    assert a is not None and not a.status.alive and "VNI already exists" in a.status.plumbing_error


@pytest.mark.parametrize(("change", "reason"), [
    ({"pod": "ghost"}, "no Topology"),
    ({"peer_pod": "b"}, "no link uid 2 to b"),
    ({"uid": 1, "vni": naming.vni(NS, 1)}, "no link uid 1 to c"),
    ({"uid": 3, "vni": naming.vni(NS, 3)}, "no link uid 3"),  # the macvlan: never a peer's business
    ({"local_intf": "eth9"}, "differs"),
    ({"peer_intf": "eth1"}, "differs"),
    ({"local_ip": "10.0.2.9/24"}, "differs"),
    ({"peer_ip": ""}, "differs"),
    ({"vni": naming.vni(NS, 2) + 1}, "differs"),
    ({"vni": naming.vni(NS, 2, naming.vni_block(NS) % naming.VNI_BLOCKS + 1)}, "is not the link's"),
    ({"peer_vtep": VTEP2}, "not alive behind VTEP|is not pod c's"),  # the caller check sees it first
], ids=["unknown-topology", "uid-not-to-caller", "uid-of-other-pods", "macvlan-uid", "local-intf", "peer-intf",
        "local-ip", "peer-ip", "vni", "vni-of-another-block", "other-vtep"])
def test_peer_update_refuses_what_the_store_does_not_back(a_and_c_alive: Node, store: SqliteStore,
                                                          change: dict[str, Any], reason: str) -> None:
    before = {t.name: t.status for t in store.list(NS)}
    with pytest.raises(PeerDenied, match=reason):
        a_and_c_alive.core.peer_update([replace(valid_update(), **change)], TRUSTED)
    assert a_and_c_alive.executor.recorded == []
    assert {t.name: t.status for t in store.list(NS)} == before


def test_one_forged_link_in_a_batch_refuses_the_batch(a_and_c_alive: Node, store: SqliteStore) -> None:
    """An honest link does not carry a forged one in: the whole batch is refused, nothing is built."""
    before = {t.name: t.status for t in store.list(NS)}
    forged = replace(valid_update(), local_intf="evil0")
    with pytest.raises(PeerDenied, match="differs"):
        a_and_c_alive.core.peer_update([valid_update(), forged], TRUSTED)
    assert a_and_c_alive.executor.recorded == []
    assert {t.name: t.status for t in store.list(NS)} == before


@pytest.mark.parametrize(("pod", "status", "reason"), [
    ("c", TopologyStatus(), "c is not alive"),
    ("c", TopologyStatus(src_ip=NODE0.vtep_ip, net_ns="/var/run/netns/pc", container_id="x", node="node0"),
     "c is not alive behind|pod c is on node node0"),  # the caller claims a pod of this very node
    ("a", TopologyStatus(), "a is not alive on node node0"),
    ("a", TopologyStatus(src_ip=VTEP2, net_ns="/var/run/netns/pa", container_id="x", node="node2"),
     "a is not alive on node node0"),
], ids=["caller-not-alive", "caller-on-our-node", "local-pod-not-alive", "local-pod-on-another-node"])
def test_peer_update_refuses_pods_that_are_not_where_the_request_says(
        a_and_c_alive: Node, store: SqliteStore, pod: str, status: TopologyStatus, reason: str) -> None:
    store.update_status(NS, pod, lambda _cur: status)
    with pytest.raises(PeerDenied, match=reason):
        a_and_c_alive.core.peer_update([valid_update()], TRUSTED)
    assert a_and_c_alive.executor.recorded == []


def test_peer_update_refuses_when_the_local_netns_is_gone(a_and_c_alive: Node, paper: PaperNetns) -> None:
    paper.paths.discard("/var/run/netns/pa")
    with pytest.raises(PeerDenied, match="no sandbox of it is set up on node node0"):
        a_and_c_alive.core.peer_update([valid_update()], TRUSTED)
    assert a_and_c_alive.executor.recorded == []


def test_add_with_a_refused_macvlan_parent_fails_before_anything_is_done(store: SqliteStore, paper: PaperNetns,
                                                                         kernel: FakeProcess) -> None:
    """a's uid 3 is a macvlan on eth0, this node's underlay: refused unless the operator lists it."""
    executor = Executor(dry_run=True)
    node = replace(NODE0, macvlan_parents=frozenset({"*"}))
    core = NodeDaemon(node, store, executor, FakePeers(), grpc_port=GRPC_PORT)
    try:
        with pytest.raises(CniError) as err:
            cni(core, "ADD", "a", paper.make("pa"), "cid-a")
        assert err.value.code == protocol.TOPOLOGY_INVALID
        assert "host interface eth0" in str(err.value) and "--macvlan-parents (env MACVLAN_PARENTS)" in str(err.value)
        assert executor.recorded == [] and get(store, "a").status == TopologyStatus()
    finally:
        core.close()


# --- who is asking (peer_auth, wired into peer_update / peer_remove) ----------------------------

@pytest.mark.parametrize("caller", [Caller(node="node1"), Caller(address=VTEP1), Caller(node="node1", address=VTEP2)],
                         ids=["c-node-certificate", "c-vtep-address", "certificate-wins-over-address"])
def test_peer_update_from_the_far_pods_node_builds(a_and_c_alive: Node, caller: Caller) -> None:
    assert a_and_c_alive.core.peer_update([valid_update()], caller) == ["created"]


@pytest.mark.parametrize(("caller", "reason"), [
    (Caller(node="node2", address=VTEP1), "caller is node node2, but pod c is on node node1"),
    (Caller(address=VTEP2), f"caller address {VTEP2} is not VTEP {VTEP1} of pod c"),
    (Caller(), "neither a certificate nor an address"),
], ids=["other-node", "other-address", "anonymous"])
def test_peer_update_from_another_node_is_refused(a_and_c_alive: Node, store: SqliteStore, caller: Caller,
                                                  reason: str) -> None:
    before = {t.name: t.status for t in store.list(NS)}
    with pytest.raises(PeerDenied, match=f"update of link uid 2 of default/a from .*{reason}"):
        a_and_c_alive.core.peer_update([valid_update()], caller)
    assert a_and_c_alive.executor.recorded == []
    assert {t.name: t.status for t in store.list(NS)} == before


@pytest.mark.parametrize("caller", [Caller(node="node1"), Caller(address=VTEP1), Caller(node="node2")],
                         ids=["its-node", "its-address", "another-node"])
def test_peer_remove_of_a_live_link_is_refused(a_and_c_alive: Node, caller: Caller) -> None:
    """c is alive on node1 behind VTEP1: its link stays, whoever asks (the flap of issue 12)."""
    with pytest.raises(PeerDenied, match="pod c is alive on node node1: its link is live"):
        a_and_c_alive.core.peer_remove([valid_update()], caller)
    assert a_and_c_alive.executor.recorded == []


def test_a_refused_peer_remove_never_takes_a_link_lock(a_and_c_alive: Node, store: SqliteStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A Remove is checked before the links' locks: a forged or refused batch cannot hold them
    (stalling this node's ADDs of those links); an allowed one takes them and checks again."""
    state = a_and_c_alive.core.state
    taken: list[list[tuple[str, int]]] = []
    take = state.link_locks_of

    def recorded(links: Any) -> Any:
        links = list(links)
        taken.append(links)
        return take(links)

    monkeypatch.setattr(state, "link_locks_of", recorded)
    with pytest.raises(PeerDenied, match="pod c is alive on node node1: its link is live"):
        a_and_c_alive.core.peer_remove([valid_update()], Caller(node="node1"))
    with pytest.raises(PeerDenied, match="differs"):
        a_and_c_alive.core.peer_remove([replace(valid_update(), local_intf="evil0")], Caller(node="node1"))
    assert taken == []
    store.update_status(NS, "c", lambda _cur: TopologyStatus())  # c's DEL
    assert a_and_c_alive.core.peer_remove([valid_update()], Caller(node="node1")) == ["absent"]
    assert taken == [[(NS, 2)]]


def test_peer_remove_once_the_far_pod_is_gone(a_and_c_alive: Node, store: SqliteStore) -> None:
    store.update_status(NS, "c", lambda _cur: TopologyStatus())  # what c's DEL writes first
    with pytest.raises(PeerDenied, match=f"caller address {VTEP2} cannot remove ends towards VTEP {VTEP1}"):
        a_and_c_alive.core.peer_remove([valid_update()], Caller(address=VTEP2))
    # The kernel (the fixture's) has no such end: absent, but the request was let through.
    assert a_and_c_alive.core.peer_remove([valid_update()], Caller(address=VTEP1)) == ["absent"]
    assert a_and_c_alive.core.peer_remove([valid_update()], Caller(node="node1")) == ["absent"]


def test_peer_remove_of_a_link_deleted_from_the_spec_is_honoured(a_and_c_alive: Node, store: SqliteStore) -> None:
    """c is alive, but a's spec lost link 2: the store shows the link gone, so c's node may remove it."""
    a = get(store, "a")
    store.apply(replace(a, links=tuple(lnk for lnk in a.links if lnk.uid != 2)))
    with pytest.raises(PeerDenied, match=f"cannot remove ends towards VTEP {VTEP1}"):
        a_and_c_alive.core.peer_remove([valid_update()], Caller(address=VTEP2))  # still only towards the caller
    assert a_and_c_alive.core.peer_remove([valid_update()], Caller(address=VTEP1)) == ["absent"]
    assert a_and_c_alive.core.peer_remove([valid_update()], TRUSTED) == ["absent"]
    # The spec has nothing to compare the name with: a name Linux refuses is refused outright.
    for bad in ("eth2\x00x", "e" * 40, "a b", ""):
        with pytest.raises(PeerDenied, match="local_intf"):
            a_and_c_alive.core.peer_remove([replace(valid_update(), local_intf=bad)], Caller(address=VTEP1))
    assert a_and_c_alive.executor.recorded == []


@pytest.mark.parametrize("kind", ["update", "remove"])
def test_peer_requests_without_a_caller_are_refused(a_and_c_alive: Node, kind: str) -> None:
    """No "trusted in-process" shortcut: a request with no caller never skips the authorisation."""
    with pytest.raises(PeerDenied, match=f"{kind}: no caller"):
        getattr(a_and_c_alive.core, f"peer_{kind}")([valid_update()], None)
    assert a_and_c_alive.executor.recorded == []


def test_a_pod_alive_here_per_the_store_but_not_set_up_here_is_left_alone(node: Node, store: SqliteStore,
                                                                          paper: PaperNetns) -> None:
    """A forged status putting a pod on this node with some namespace: not in the node-local record,
    so it is not alive here and nothing is run anywhere (the store's net_ns is never used)."""
    set_alive(store, "a", "node0", NODE0.vtep_ip, paper.make("victim"), "cid-forged")
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"), "cid-c")
    assert node.core.reconcile() == 0
    assert node.executor.recorded == []
    assert not node.core.state.pod_states(store.list(NS))["a"].alive
    with pytest.raises(PeerDenied, match="no sandbox of it is set up on node node0"):
        node.core.peer_update([valid_update()], TRUSTED)


# --- DEL ---------------------------------------------------------------------------------------

def test_del_of_another_container_changes_nothing(node: Node, store: SqliteStore, paper: PaperNetns) -> None:
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    cni(node.core, "ADD", "a", paper.make("pa"), "cid-new")
    node.executor.recorded.clear()
    node.peers.calls.clear()
    before = get(store, "a").status
    assert cni(node.core, "DEL", "a", "/var/run/netns/pa", "cid-old") is None
    assert node.executor.recorded == [] and node.peers.calls == []
    assert get(store, "a").status == before


def test_del_removes_our_ends_tells_remote_peers_and_clears_the_status(node: Node, store: SqliteStore,
                                                                       paper: PaperNetns) -> None:
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
    node.executor.recorded.clear()
    node.peers.calls.clear()
    cni(node.core, "DEL", "a", "/var/run/netns/pa", "cid-a")
    # One batched kernel call for every interface meshnet made in the pod (its link group).
    assert lines(node) == [f"ip -n pa link del group {naming.LINK_GROUP}"]
    assert [(m, addr, lnk.pod, lnk.uid) for m, addr, lnk in node.peers.calls] == [
        ("remove", f"{VTEP1}:{GRPC_PORT}", "c", 2)]
    assert get(store, "a").status == TopologyStatus()


def test_repeated_del_succeeds(node: Node, paper: PaperNetns) -> None:
    assert cni(node.core, "DEL", "a", "/var/run/netns/never", "cid-x") is None
    assert cni(node.core, "DEL", "a", "/var/run/netns/never", "cid-x") is None


# --- API calls per ADD with the kube store do not grow with the number of links ------------------

def star(n: int) -> str:
    """Pod `hub` with `n` links to pods s1..sn."""
    docs = [{"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": {"name": "hub"},
             "spec": {"links": [{"uid": i, "peer_pod": f"s{i}", "local_intf": f"eth{i}", "peer_intf": "eth1"}
                                for i in range(1, n + 1)]}}]
    docs += [{"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": {"name": f"s{i}"},
              "spec": {"links": [{"uid": i, "peer_pod": "hub", "local_intf": "eth1", "peer_intf": f"eth{i}"}]}}
             for i in range(1, n + 1)]
    return "\n---\n".join(json.dumps(d) for d in docs)


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def api_calls_for_one_add(kube_api: KubeApiServer, paper: PaperNetns, links: int,
                          topologies_elsewhere: int = 0) -> tuple[int, int, list[str]]:
    """API requests of one ADD (the hub of a star) with the daemon's informer running, as in meshnetd:
    (requests, kernel commands planned, the requests as "METHOD path")."""
    from meshnet.store.cache import Informer
    from meshnet.store.kube import KubeStore

    store = KubeStore(kubeconfig=kube_api.kubeconfig)
    node = make_node(store)
    stopping = threading.Event()
    watcher = threading.Thread(target=Informer(node.core.state.cache).run, args=(store, stopping))
    try:
        for t in parse_manifest(star(links)).topologies:
            store.apply(t)
        for i in range(topologies_elsewhere):
            store.apply(Topology(f"p{i}", f"other{i % 7}", (Link(1, f"p{i ^ 1}", "eth1", "eth1"),)))
        for i in range(1, links + 1):  # every peer alive on one of two other nodes
            vtep = VTEP1 if i % 2 else VTEP2
            set_alive(store, f"s{i}", f"node{1 + i % 2}", vtep, f"/var/run/netns/s{i}")
        watcher.start()
        cache = node.core.state.cache
        want = links + 1 + topologies_elsewhere
        wait_for(lambda: len(cache) == want and all(
            (t := cache.get(NS, f"s{i}")) is not None and t.status.alive for i in range(1, links + 1)))
        kube_api.reset_counts()
        cni(node.core, "ADD", "hub", paper.make("hub"), "cid-hub")
        assert len(node.peers.calls) == links
        # One peer call per peer node, however many links lead there.
        assert sorted(b[1] for b in node.peers.batches) == sorted({f"{VTEP1}:{GRPC_PORT}", f"{VTEP2}:{GRPC_PORT}"})
        requests = [f"{r.method} {r.path}" for r in kube_api.requests if not r.query.get("watch")]
        return len(requests), len(node.executor.recorded), requests
    finally:
        stopping.set()
        if watcher.ident is not None:
            watcher.join(10)
        node.core.close()
        store.close()


def test_api_calls_per_add_do_not_grow_with_links(kube_api: KubeApiServer, paper: PaperNetns,
                                                  kernel: FakeProcess) -> None:
    few, commands_few, _ = api_calls_for_one_add(kube_api, paper, 2)
    with KubeApiServer() as other:
        many, commands_many, requests = api_calls_for_one_add(other, paper, 40)
    assert commands_many > commands_few  # the 40 links were really planned
    assert few == many
    # The Topology and its peers come from the informer's cache (no GET, no LIST): ONE PUT marks
    # it alive and records its links' states (from the cached copy).
    assert many == 1, requests
    assert not [r for r in requests if r.startswith("GET")], requests


def test_api_calls_per_add_do_not_grow_with_the_cluster(kube_api: KubeApiServer, paper: PaperNetns,
                                                        kernel: FakeProcess) -> None:
    """Topologies in other namespaces cost an ADD nothing: it neither LISTs nor walks them."""
    calls, _, requests = api_calls_for_one_add(kube_api, paper, 4, topologies_elsewhere=300)
    assert calls == 1, requests
    assert not [r for r in requests if r.startswith("GET")], requests


# --- races of one status writer per ADD (issue 14, item 2) -----------------------------------------

def test_del_of_an_older_sandbox_during_a_newer_add_leaves_the_pod_alone(node: Node, store: SqliteStore,
                                                                          paper: PaperNetns,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet removes a dead sandbox after the pod's new one was ADDed: here its DEL runs while
    the new ADD is still building (before the ADD's one status write). The DEL must neither clear
    the status nor ask the peers to remove their ends: the pod is the new sandbox's now."""
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    cni(node.core, "ADD", "a", paper.make("pa-old"), "cid-old")
    assert get(store, "a").status.container_id == "cid-old"
    node.peers.calls.clear()
    building, release = threading.Event(), threading.Event()
    real_build = node.core.cni.build

    def slow_build(namespace: str, plans: Any) -> None:
        if plans:
            building.set()
            assert release.wait(10)
        real_build(namespace, plans)

    monkeypatch.setattr(node.core.cni, "build", slow_build)
    errors: list[BaseException] = []

    def add_new() -> None:
        try:
            cni(node.core, "ADD", "a", paper.make("pa-new"), "cid-new")
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    adder = threading.Thread(target=add_new)
    adder.start()
    try:
        assert building.wait(10)
        # The ADD of the new sandbox is half-way: the store still says "cid-old".
        assert get(store, "a").status.container_id == "cid-old"
        cni(node.core, "DEL", "a", "/var/run/netns/pa-old", "cid-old")
        assert get(store, "a").status.container_id == "cid-old"  # not cleared
        assert not [c for c in node.peers.calls if c[0] == "remove"]
    finally:
        release.set()
        adder.join(10)
    assert not errors, errors
    st = get(store, "a").status
    assert st.container_id == "cid-new" and st.alive and st.net_ns == "/var/run/netns/pa-new"
    assert [(m, lnk.uid) for m, _, lnk in node.peers.calls] == [("update", 2)]


def add_at_once(core: NodeDaemon, adds: Sequence[tuple[str, str, str]]) -> None:
    """CNI ADDs (pod, netns path, container) started at the same moment, each in its own thread."""
    barrier = threading.Barrier(len(adds))
    errors: list[BaseException] = []

    def add(pod: str, netns_path: str, container: str) -> None:
        try:
            barrier.wait(10)
            cni(core, "ADD", pod, netns_path, container)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=add, args=a) for a in adds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors


def test_two_pods_added_at_once_both_record_their_veth_link_up(store: SqliteStore, paper: PaperNetns,
                                                               kernel: FakeProcess) -> None:
    """Two linked pods on one node ADDed at the same moment, again and again: each plans from the
    cache before its one status write, so neither may see the other alive; the later writer sees
    the earlier once caught up with its own write and builds the link. Always: both record it up."""
    from meshnet.store.cache import Informer

    for attempt in range(15):
        n = make_node(store)
        stopping = threading.Event()
        watcher = threading.Thread(target=Informer(n.core.state.cache).run, args=(store, stopping))
        watcher.start()
        try:
            assert n.core.state.cache.wait_synced(10)
            add_at_once(n.core, [(p, paper.make(f"p{p}{attempt}"), f"cid-{p}-{attempt}") for p in ("a", "b")])
            n.core.link_status.flush()
            for pod in ("a", "b"):
                states = {s.uid: s.state for s in get(store, pod).status.links}
                assert states.get(1) == "up", (attempt, pod, get(store, pod).status)
        finally:
            stopping.set()
            watcher.join(10)
            n.core.close()
        for pod in ("a", "b"):
            store.update_status(NS, pod, lambda cur: TopologyStatus())


def _add_in_a_crowded_namespace(tmp_path: Path, paper: PaperNetns, crowd: int,
                                ) -> tuple[list[str], TopologyStatus, list[Any], set[tuple[str, str]]]:
    """The ADD of `a` (MANIFEST) with `crowd` more pods in its namespace (pairs linked to each
    other, every third alive on another node with the namespace's VNI block), the daemon's informer
    running: (kernel commands, a's status, peer calls, the pods whose copies the ADD read)."""
    from meshnet.store.cache import Informer

    block = 17  # the namespace's block, as b (and the crowd's pods alive) recorded it
    store = SqliteStore(tmp_path / f"crowd{crowd}.db")
    for t in parse_manifest(MANIFEST).topologies:
        store.apply(t)
    for i in range(crowd):
        store.apply(Topology(f"x{i}", NS, (Link(1000 + i // 2, f"x{i ^ 1}", "eth1", "eth1"),)))
        if i % 3 == 0:
            store.update_status(NS, f"x{i}", lambda cur, i=i: TopologyStatus(
                src_ip=VTEP2, net_ns=f"/var/run/netns/x{i}", container_id=f"cx{i}", node="node2", vni_block=block))
    node = make_node(store)
    set_alive(store, "b", "node0", NODE0.vtep_ip, paper.make("pb"), here=node.core)
    store.update_status(NS, "b", lambda cur: replace(cur.status, vni_block=block))
    set_alive(store, "c", "node1", VTEP1, paper.make("pc"))
    cache = node.core.state.cache
    stopping = threading.Event()
    watcher = threading.Thread(target=Informer(cache).run, args=(store, stopping))
    watcher.start()
    try:
        wait_for(lambda: len(cache) == 4 + crowd and (t := cache.get(NS, "b")) is not None and t.status.vni_block)
        read: set[tuple[str, str]] = set()
        copy = cache._copy

        def counted(key: tuple[str, str]) -> Topology | None:
            read.add(key)
            return copy(key)

        def walk(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("an ADD walked every Topology of a namespace or of the cluster")

        cache._copy = counted  # type: ignore[method-assign]
        cache.namespace = walk  # type: ignore[method-assign]
        cache.all = walk  # type: ignore[method-assign]
        store.list = walk  # type: ignore[method-assign]
        cni(node.core, "ADD", "a", paper.make("pa"), "cid-a")
        cache._copy = copy  # type: ignore[method-assign]
        return lines(node), get(store, "a").status, list(node.peers.calls), read
    finally:
        stopping.set()
        watcher.join(10)
        node.core.close()
        store.close()


def test_an_add_reads_only_its_own_and_its_peers_copies_however_crowded_its_namespace(
        tmp_path: Path, paper: PaperNetns, kernel: FakeProcess) -> None:
    """Issue 14 item 5: an ADD's work must not grow with the pods of its namespace (the VNI block
    came from a walk of all of them). The same ADD, alone and among 600 pods: the same commands,
    status and peer calls, and only the copies of a and of the pods its links name read (d: never
    alive; "localhost": the macvlan link's peer, looked up like any peer)."""
    alone = _add_in_a_crowded_namespace(tmp_path, paper, 0)
    crowded = _add_in_a_crowded_namespace(tmp_path, paper, 600)
    assert crowded[:3] == alone[:3]
    assert crowded[1].vni_block == 17  # the namespace's block, found without the walk
    assert crowded[3] <= {(NS, p) for p in ("a", "b", "c", "d", "localhost")}, sorted(crowded[3])
