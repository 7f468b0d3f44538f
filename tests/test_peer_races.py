"""Peer requests racing each other on one link, forced into the interleaving that would lose it:
real namespaces (`mnt-`, always removed), the real `ip`, meshnetd's core in-process, the calling
node's daemon played by the test (its requests as its gRPC edge would hand them in)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshnet import rtnl
from meshnet.daemon.config import DEFAULT_GRPC_PORT as GRPC_PORT
from meshnet.daemon.netns import NETNS_DIR
from meshnet.daemon.node import NodeDaemon
from meshnet.daemon.peer_auth import Caller
from meshnet.daemon.peer_service import PeerDenied
from meshnet.executor import Executor
from meshnet.model import TopologyStatus, parse_manifest
from meshnet.plan import NodeInfo
from meshnet.store.sqlite import SqliteStore
from tests.netns import ip, netns_set
from tests.test_daemon_core import NS, FakePeers, cni
from tests.test_reconciler_races import VETH_AND_VXLAN

pytestmark = pytest.mark.root

NODE1 = Caller(node="node1")
VTEP1 = "198.51.100.2"


def c_alive(container: str) -> Any:
    return lambda _cur: TopologyStatus(src_ip=VTEP1, net_ns="/var/run/netns/x", container_id=container, node="node1")


@pytest.mark.parametrize(("stalled_read", "outcome"), [
    (1, ("refused", ["unchanged"])),  # its check before the locks: the check under them refuses
    (2, (["removed"], ["created"])),  # its check under the locks: the update waits, builds again
], ids=["before-the-locks", "under-the-locks"])
def test_a_late_remove_never_deletes_the_end_the_far_pods_next_incarnation_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stalled_read: int, outcome: tuple[Any, Any]) -> None:
    """c (on node1) went: its DEL cleared its status and asked this node to remove b's end of their
    vxlan. That Remove read c dead, then stalled (a busy node; the DEL's deadline passed and the DEL
    went on). c came back on node1 (same VTEP, same VNI) and its ADD's update found b's end in
    place. The stalled Remove then went on and deleted it: a DEL undoing a newer ADD, the link
    down until a pass noticed. Now the Remove checks again under the link's lock: stalled before
    that, it is refused (c is alive again); stalled after, it holds the lock, so the update waits
    for it and builds the end again."""
    with netns_set(3) as (node_ns, pa, pb):
        ip("-n", node_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "up0")  # the VTEP's uplink
        ip("-n", node_ns, "addr", "add", "198.51.100.1/24", "dev", "eth0")
        ip("-n", node_ns, "link", "set", "eth0", "up")
        store = SqliteStore(tmp_path / "store.db")
        for t in parse_manifest(VETH_AND_VXLAN).topologies:
            store.apply(t)
        store.update_status(NS, "c", c_alive("c-c"))
        peers = FakePeers()
        core = NodeDaemon(NodeInfo("node0", "198.51.100.1", "eth0", node_ns), store, Executor(), peers,
                          grpc_port=GRPC_PORT)
        read, go = threading.Event(), threading.Event()
        removed: list[Any] = []
        updated: list[Any] = []
        try:
            cni(core, "ADD", "a", str(NETNS_DIR / pa), "c-a")
            cni(core, "ADD", "b", str(NETNS_DIR / pb), "c-b")
            assert "eth2" in rtnl.links(pb)
            sent = next(link for verb, _, link in peers.calls if verb == "update" and link.uid == 2)
            # What node1 asks about b's end: the same link seen from c's side.
            req = replace(sent, pod="b", peer_pod="c", local_intf=sent.peer_intf, peer_intf=sent.local_intf,
                          local_ip=sent.peer_ip, peer_ip=sent.local_ip, peer_vtep=VTEP1)

            store.update_status(NS, "c", lambda _cur: TopologyStatus())  # c's DEL, first step
            original = core.peer_service.read_topology

            reads = 0

            def stalled(namespace: str, pod: str, fresh: Any = None) -> Any:
                nonlocal reads
                found = original(namespace, pod, fresh)
                if pod == "c" and fresh is None:  # the Remove's look at c
                    reads += 1
                    if reads == stalled_read:
                        read.set()
                        assert go.wait(20)
                return found

            monkeypatch.setattr(core.peer_service, "read_topology", stalled)

            def call(out: list[Any], fn: Any) -> None:
                try:
                    out.append(fn([req], NODE1))
                except PeerDenied as e:
                    out.append("refused" if "pod c is alive on node node1" in str(e) else e)
                except BaseException as e:  # reported by the assertions below
                    out.append(e)

            remover = threading.Thread(target=call, args=(removed, core.peer_remove))
            remover.start()
            assert read.wait(20)
            assert not store.get(NS, "c").status.alive  # what the Remove saw
            store.update_status(NS, "c", c_alive("c-c2"))  # c's next incarnation, its ADD on node1
            core.state.cache.offer(store.get(NS, "c"))  # and the watch brings it (no watch runs here)
            at_locks, got_locks = threading.Event(), threading.Event()
            take = core.state.link_locks

            def watched(namespace: str, uids: Any) -> Any:
                if threading.current_thread() is updater:
                    at_locks.set()
                    held = take(namespace, uids)
                    got_locks.set()
                    return held
                return take(namespace, uids)

            monkeypatch.setattr(core.state, "link_locks", watched)
            updater = threading.Thread(target=call, args=(updated, core.peer_update))
            updater.start()
            assert at_locks.wait(20)
            if got_locks.wait(1.0):  # nothing held the link: the update runs through first
                updater.join(20)
            go.set()
            remover.join(20)
            updater.join(20)
            assert not remover.is_alive() and not updater.is_alive()
            assert "eth2" in rtnl.links(pb), f"the late Remove deleted the end c's next incarnation had built: " \
                                              f"{removed}, {updated}"
            assert (removed[0], updated[0]) == outcome
            assert {s.uid: s.state for s in store.get(NS, "b").status.links} == {1: "up", 2: "up"}
            assert core.state.link_locks_in_use() == 0
        finally:
            go.set()
            core.close()
            store.close()
