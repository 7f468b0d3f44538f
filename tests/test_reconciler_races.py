"""A reconcile pass racing the CNI calls it shares a node with, forced into the interleaving that
lost links: real namespaces (`mnt-`, always removed), the real `ip`, meshnetd's core in-process."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from benchmarks.foundation import manifest_text as two_pod_manifest
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
