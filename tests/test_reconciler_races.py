"""A reconcile pass racing the CNI calls it shares a node with, forced into the interleaving that
lost links: real namespaces (`mnt-`, always removed), the real `ip`, meshnetd's core in-process."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from meshnet import rtnl
from meshnet.daemon.config import DEFAULT_GRPC_PORT as GRPC_PORT
from meshnet.daemon.netns import NETNS_DIR
from meshnet.daemon.node import NodeDaemon
from meshnet.executor import Executor
from meshnet.model import parse_manifest
from meshnet.plan import NodeInfo
from meshnet.store.sqlite import SqliteStore
from tests.netns import netns_set
from tests.test_daemon_core import NS, FakePeers, cni

pytestmark = pytest.mark.root

PAIR = """
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: a}
spec:
  links:
  - {uid: 1, peer_pod: b, local_intf: eth1, peer_intf: eth1, local_ip: 10.77.1.1/24, peer_ip: 10.77.1.2/24}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: b}
spec:
  links:
  - {uid: 1, peer_pod: a, local_intf: eth1, peer_intf: eth1, local_ip: 10.77.1.2/24, peer_ip: 10.77.1.1/24}
"""


def test_a_pass_keeps_the_veth_a_peers_add_built_before_writing_that_it_is_alive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """b's ADD builds the veth to a (both ends) first and writes that b is alive after. A pass for
    a in between saw the veth's end, the link pending and b dead in the store, and removed it as
    an end left towards a dead pod: both ends were then recorded up with no veth in the kernel
    (seen as a lab's link "missing" after 20 pods were deleted and added again at once)."""
    with netns_set(3) as (node_ns, pa, pb):
        store = SqliteStore(tmp_path / "store.db")
        for t in parse_manifest(PAIR).topologies:
            store.apply(t)
        core = NodeDaemon(NodeInfo("node0", "198.51.100.1", "eth0", node_ns), store, Executor(), FakePeers(),
                          grpc_port=GRPC_PORT)
        built, go = threading.Event(), threading.Event()
        outcome: list[Any] = []
        try:
            cni(core, "ADD", "a", str(NETNS_DIR / pa), "c-a")  # a is up; its veth waits for b
            assert "eth1" not in rtnl.links(pa)
            write = core.cni.link_status.write_outcome

            def held(topo: Any, *args: Any, **kw: Any) -> Any:  # b's ADD, between its build and its write
                if topo.name == "b" and not built.is_set():
                    built.set()
                    assert go.wait(20)
                return write(topo, *args, **kw)

            monkeypatch.setattr(core.cni.link_status, "write_outcome", held)

            def add_b() -> None:
                try:
                    outcome.append(cni(core, "ADD", "b", str(NETNS_DIR / pb), "c-b"))
                except BaseException as e:  # reported by the assertion below
                    outcome.append(e)

            adder = threading.Thread(target=add_b)
            adder.start()
            assert built.wait(20)
            assert "eth1" in rtnl.links(pa) and "eth1" in rtnl.links(pb)
            assert not store.get(NS, "b").status.alive  # the store does not say so yet
            core.reconcile({(NS, "a")})  # a pass for a meanwhile (another pod's event woke it)
            assert "eth1" in rtnl.links(pa), "the pass removed the veth b's ADD had just built"
            go.set()
            adder.join(20)
            assert len(outcome) == 1 and isinstance(outcome[0], dict), outcome
            monkeypatch.undo()
            assert "eth1" in rtnl.links(pa) and "eth1" in rtnl.links(pb)
            assert [s.state for s in store.get(NS, "a").status.links] == ["up"]
            assert [s.state for s in store.get(NS, "b").status.links] == ["up"]
            assert core.reconcile() == 0  # nothing left to heal
        finally:
            go.set()
            core.close()
            store.close()
