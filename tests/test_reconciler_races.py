"""A reconcile pass racing the CNI calls it shares a node with, forced into the interleaving that
lost links: real namespaces (`mnt-`, always removed), the real `ip`, meshnetd's core in-process."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks.foundation import manifest_text as two_pod_manifest
from meshnet import rtnl
from meshnet.daemon.config import DEFAULT_GRPC_PORT as GRPC_PORT
from meshnet.daemon.netns import NETNS_DIR
from meshnet.daemon.node import NodeDaemon
from meshnet.executor import Executor
from meshnet.model import TopologyStatus, parse_manifest
from meshnet.plan import NodeInfo
from meshnet.store.sqlite import SqliteStore
from tests.netns import ip, netns_set
from tests.test_daemon_core import NS, FakePeers, cni

pytestmark = pytest.mark.root


def test_a_pass_keeps_the_veth_a_peers_add_built_before_writing_that_it_is_alive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """p2's ADD builds the veth to p1 (both ends) first and writes that p2 is alive after. A pass for
    p1 in between saw the veth's end, the link pending and p2 dead in the store, and removed it as
    an end left towards a dead pod: both ends were then recorded up with no veth in the kernel
    (seen as a lab's link "missing" after 20 pods were deleted and added again at once)."""
    with netns_set(3) as (node_ns, pa, pb):
        store = SqliteStore(tmp_path / "store.db")
        for t in parse_manifest(two_pod_manifest(1)).topologies:
            store.apply(t)
        core = NodeDaemon(NodeInfo("node0", "198.51.100.1", "eth0", node_ns), store, Executor(), FakePeers(),
                          grpc_port=GRPC_PORT)
        built, go = threading.Event(), threading.Event()
        outcome: list[Any] = []
        try:
            cni(core, "ADD", "p1", str(NETNS_DIR / pa), "c-a")  # p1 is up; its veth waits for p2
            assert "eth1" not in rtnl.links(pa)
            write = core.cni.link_status.write_outcome

            def held(topo: Any, *args: Any, **kw: Any) -> Any:  # p2's ADD, between its build and its write
                if topo.name == "p2" and not built.is_set():
                    built.set()
                    assert go.wait(20)
                return write(topo, *args, **kw)

            monkeypatch.setattr(core.cni.link_status, "write_outcome", held)

            def add_b() -> None:
                try:
                    outcome.append(cni(core, "ADD", "p2", str(NETNS_DIR / pb), "c-b"))
                except BaseException as e:  # reported by the assertion below
                    outcome.append(e)

            adder = threading.Thread(target=add_b)
            adder.start()
            assert built.wait(20)
            assert "eth1" in rtnl.links(pa) and "eth1" in rtnl.links(pb)
            assert not store.get(NS, "p2").status.alive  # the store does not say so yet
            core.reconcile({(NS, "p1")})  # a pass for p1 meanwhile (another pod's event woke it)
            assert "eth1" in rtnl.links(pa), "the pass removed the veth p2's ADD had just built"
            go.set()
            adder.join(20)
            assert len(outcome) == 1 and isinstance(outcome[0], dict), outcome
            monkeypatch.undo()
            assert "eth1" in rtnl.links(pa) and "eth1" in rtnl.links(pb)
            assert [s.state for s in store.get(NS, "p1").status.links] == ["up"]
            assert [s.state for s in store.get(NS, "p2").status.links] == ["up"]
            assert core.reconcile() == 0  # nothing left to heal
            assert core.state.link_locks_in_use() == 0  # an idle node keeps no link's lock
        finally:
            go.set()
            core.close()
            store.close()


# a and b on this node (a veth, uid 1); b also has a vxlan link (uid 2) to c on node1.
VETH_AND_VXLAN = """
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: a}
spec:
  links:
  - {uid: 1, peer_pod: b, local_intf: eth1, peer_intf: eth1, local_ip: 10.81.1.1/24, peer_ip: 10.81.1.2/24}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: b}
spec:
  links:
  - {uid: 1, peer_pod: a, local_intf: eth1, peer_intf: eth1, local_ip: 10.81.1.2/24, peer_ip: 10.81.1.1/24}
  - {uid: 2, peer_pod: c, local_intf: eth2, peer_intf: eth2, local_ip: 10.81.2.1/24, peer_ip: 10.81.2.2/24}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: c}
spec:
  links:
  - {uid: 2, peer_pod: b, local_intf: eth2, peer_intf: eth2, local_ip: 10.81.2.2/24, peer_ip: 10.81.2.1/24}
"""


def test_a_pass_records_up_only_what_a_read_under_its_own_locks_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass reads each namespace once: b's view comes from a's turn (b is a's veth peer), before
    b's locks. b's vxlan end went in between (a failed build's rollback does that) while b's
    status had the link in error: the pass called it up from the old view, and the link was
    recorded up with no end in the kernel until the next full pass."""
    with netns_set(3) as (node_ns, pa, pb):
        # The VTEP's uplink, inside the test's own namespace (a veth: this kernel has no dummy).
        ip("-n", node_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "up0")
        ip("-n", node_ns, "addr", "add", "198.51.100.1/24", "dev", "eth0")
        ip("-n", node_ns, "link", "set", "eth0", "up")
        store = SqliteStore(tmp_path / "store.db")
        for t in parse_manifest(VETH_AND_VXLAN).topologies:
            store.apply(t)
        store.update_status(NS, "c", lambda cur: TopologyStatus(src_ip="198.51.100.2", net_ns="/var/run/netns/x",
                                                                container_id="c-c", node="node1"))
        core = NodeDaemon(NodeInfo("node0", "198.51.100.1", "eth0", node_ns), store, Executor(), FakePeers(),
                          grpc_port=GRPC_PORT)
        try:
            cni(core, "ADD", "a", str(NETNS_DIR / pa), "c-a")
            cni(core, "ADD", "b", str(NETNS_DIR / pb), "c-b")
            assert {"eth1", "eth2"} <= set(rtnl.links(pb))

            def in_error(cur: Any) -> Any:
                links = tuple(replace(s, state="error", message="peer update failed") if s.uid == 2 else s
                              for s in cur.status.links)
                return replace(cur.status, links=links)

            store.update_status(NS, "b", in_error)
            turn = core.reconciler.reconcile_pod

            def then_eth2_goes(topo: Any, *args: Any) -> int:
                changed = turn(topo, *args)
                if topo.name == "a":  # after a's turn read b's namespace
                    ip("-n", pb, "link", "del", "eth2")
                return changed

            monkeypatch.setattr(core.reconciler, "reconcile_pod", then_eth2_goes)
            core.reconcile({(NS, "a"), (NS, "b")})
            assert "eth2" in rtnl.links(pb), "recorded up from a view older than b's locks"
            assert {s.uid: s.state for s in store.get(NS, "b").status.links} == {1: "up", 2: "up"}
        finally:
            core.close()
            store.close()
