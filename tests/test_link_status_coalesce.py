"""Peers' news about one pod's links is coalesced while the node is busy: one write per pod per
window, not one per link (issue 14, item 2)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshnet.daemon.link_status import IDLE_SECONDS, LinkStatusWriter
from meshnet.daemon.state import NodeState
from meshnet.executor import Executor
from meshnet.model import Link, LinkStatus, Topology, TopologyStatus
from meshnet.plan import NodeInfo
from meshnet.store.sqlite import SqliteStore

NS = "default"


class CountingStore(SqliteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.patches: list[tuple[str, list[int]]] = []

    def update_link_states(self, namespace: str, name: str, container: str, states: Sequence[LinkStatus], *,
                           known: Topology) -> Topology | None:
        self.patches.append((name, [s.uid for s in states]))
        return super().update_link_states(namespace, name, container, states, known=known)


def setup(tmp_path: Path) -> tuple[CountingStore, NodeState, Topology]:
    store = CountingStore(tmp_path / "s.db")
    store.apply(Topology("hub", NS, tuple(Link(u, f"p{u}", f"eth{u}", "eth1") for u in range(1, 7))))
    hub = store.update_status(NS, "hub", lambda cur: TopologyStatus(
        src_ip="198.51.100.1", net_ns="/x", container_id="c1", node="n0",
        links=tuple(LinkStatus(u, "vxlan", "pending", "waiting", f"eth{u}") for u in range(1, 7))))
    assert hub is not None
    state = NodeState(NodeInfo("n0", "198.51.100.1", "lo"), store, Executor(dry_run=True), grpc_port=1)
    return store, state, hub


def up(uid: int) -> LinkStatus:
    return LinkStatus(uid, "vxlan", "up", "", f"eth{uid}")


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_news_from_several_peers_while_the_node_is_busy_is_one_write(tmp_path: Path) -> None:
    store, state, hub = setup(tmp_path)
    writer = LinkStatusWriter(state, window=30.0)
    try:
        with writer.working():  # e.g. an ADD being served: the node is busy
            threads = [threading.Thread(target=writer.write, args=(hub, [up(u)])) for u in range(1, 7)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(IDLE_SECONDS + 0.1)
            assert store.patches == []  # gathered while busy
            assert sorted(writer.pending(NS, "hub")) == [1, 2, 3, 4, 5, 6]
        started = time.monotonic()
        wait_for(lambda: store.patches)  # the node went idle: written soon after, in one patch
        assert time.monotonic() - started < 2
        time.sleep(IDLE_SECONDS + 0.1)
        assert store.patches == [("hub", [1, 2, 3, 4, 5, 6])]
        assert writer.pending(NS, "hub") == {}
        got = store.get(NS, "hub")
        assert got is not None and [s.state for s in got.status.links] == ["up"] * 6
    finally:
        writer.close()
        store.close()


def test_lone_news_on_an_idle_node_is_written_at_once(tmp_path: Path) -> None:
    store, state, hub = setup(tmp_path)
    writer = LinkStatusWriter(state, window=30.0)
    try:
        with writer.working():  # the peer request that brings the news is this thread's own work
            writer.write(hub, [up(1)])
            assert store.patches == [("hub", [1])]
    finally:
        writer.close()
        store.close()


def test_a_node_busy_longer_than_the_window_writes_at_the_window_s_end(tmp_path: Path) -> None:
    store, state, hub = setup(tmp_path)
    writer = LinkStatusWriter(state, window=0.3)
    try:
        with writer.working():
            done = threading.Event()
            t = threading.Thread(target=lambda: (writer.write(hub, [up(1)]), writer.write(hub, [up(2)]), done.set()))
            t.start()
            t.join()
            started = time.monotonic()
            wait_for(lambda: store.patches, timeout=3)
            assert 0.1 < time.monotonic() - started < 2  # still busy: the window decided
            assert store.patches == [("hub", [1, 2])]
    finally:
        writer.close()
        store.close()


def test_later_news_of_a_link_wins_and_close_writes_what_is_left(tmp_path: Path) -> None:
    store, state, hub = setup(tmp_path)
    writer = LinkStatusWriter(state, window=30.0)
    writer.write(hub, [up(1)])  # written at once: the node is idle
    with writer.working():  # busy: gathered
        writer_thread = threading.Thread(target=lambda: (
            writer.write(hub, [up(3)]),
            writer.write(hub, [LinkStatus(3, "vxlan", "error", "far end failed", "eth3"), up(2)])))
        writer_thread.start()
        writer_thread.join()
        assert store.patches == [("hub", [1])]
        writer.close()  # the daemon stops: nothing gathered is lost
    got = store.get(NS, "hub")
    assert got is not None and [(s.uid, s.state) for s in got.status.links][:4] == [
        (1, "up"), (2, "up"), (3, "error"), (4, "pending")]
    assert store.patches == [("hub", [1]), ("hub", [2, 3])]
    store.close()


def test_news_for_a_replaced_sandbox_is_not_written(tmp_path: Path) -> None:
    store, state, hub = setup(tmp_path)
    writer = LinkStatusWriter(state, window=30.0)
    writer.write(hub, [up(1)])  # written at once
    with writer.working():
        gathered = threading.Thread(target=writer.write, args=(hub, [up(2)]))  # gathered: the node is busy
        gathered.start()
        gathered.join()
        # The sandbox is replaced before the news is due.
        store.update_status(NS, "hub", lambda cur: TopologyStatus(src_ip="198.51.100.1", net_ns="/y",
                                                                  container_id="c2", node="n0"))
        writer.close()
    got: Any = store.get(NS, "hub")
    assert got.status.container_id == "c2" and got.status.links == ()
    store.close()


def test_news_the_freshest_copy_shows_already_costs_no_call(tmp_path: Path) -> None:
    store, state, hub = setup(tmp_path)
    writer = LinkStatusWriter(state, window=0.0)
    try:
        writer.write(hub, [up(1)])  # written (the copy handed in is the only one)
        assert store.patches == [("hub", [1])] and writer.writes == 1
        now = store.get(NS, "hub")
        assert now is not None
        state.cache.load([now])  # the watch brought the result
        writer.write(hub, [up(1)])  # an older copy, but the cache's newer one shows the news
        assert store.patches == [("hub", [1])] and writer.skipped == 1
        writer.write(hub, [up(2)])  # real news is written, from the newer copy
        assert store.patches == [("hub", [1]), ("hub", [2])]
    finally:
        writer.close()
        store.close()
