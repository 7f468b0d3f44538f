"""The informer's cache (meshnet.store.cache): events, indexes, misses, own writes, and the one watch
that feeds it against both stores (the API test server: resume, bookmarks, 410 relist)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshnet.model import Link, Topology, TopologyStatus
from meshnet.store.base import Store, WatchEvent
from meshnet.store.cache import Informer, TopologyCache
from meshnet.store.sqlite import SqliteStore
from tests.kubeapi.server import KubeApiServer


def topo(name: str, peers: tuple[str, ...] = (), ns: str = "default", rv: str = "1",
         status: TopologyStatus | None = None) -> Topology:
    links = tuple(Link(i + 1, p, f"eth{i + 1}", f"eth{i + 1}") for i, p in enumerate(peers))
    return Topology(name, ns, links, status or TopologyStatus(), resource_version=rv)


def alive(node: str, block: int = 0) -> TopologyStatus:
    return TopologyStatus(src_ip="198.51.100.1", net_ns="/var/run/netns/x", container_id="c", node=node,
                          vni_block=block)


def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class CountingStore:
    """A store whose `get` is counted (the cache's misses go there)."""

    def __init__(self, objects: dict[tuple[str, str], Topology]) -> None:
        self.objects = objects
        self.gets = 0

    def get(self, namespace: str, name: str) -> Topology | None:
        self.gets += 1
        return self.objects.get((namespace, name))


# --- events and indexes --------------------------------------------------------------------------


def test_load_reports_the_difference_and_events_return_the_previous_copy() -> None:
    cache = TopologyCache()
    assert not cache.synced
    first = cache.load([topo("a", ("b",)), topo("b", ("a",))])
    assert [(e.type, e.topology.name, old) for e, old in first] == [("ADDED", "a", None), ("ADDED", "b", None)]
    assert cache.synced and len(cache) == 2
    a2 = topo("a", ("b",), rv="2", status=alive("n0"))
    assert cache.apply(WatchEvent("MODIFIED", a2)) == topo("a", ("b",))
    assert cache.get("default", "a") == a2
    # A relist (after a 410) that lost b and changed nothing else: only the deletion is reported.
    again = cache.load([a2])
    assert [(e.type, e.topology.name) for e, _ in again] == [("DELETED", "b")]
    assert cache.get("default", "b") is None and cache.keys() == {("default", "a")}


def test_peer_index_finds_the_pods_linking_to_a_pod_without_a_scan() -> None:
    cache = TopologyCache()
    cache.load([topo("a", ("hub",)), topo("b", ("hub", "a")), topo("hub", ("a", "b")),
                topo("a", ("hub",), ns="other")])
    assert [t.name for t in cache.linking_to("default", "hub")] == ["a", "b"]
    assert [t.name for t in cache.linking_to("default", "a")] == ["b", "hub"]
    assert [t.key for t in cache.linking_to("other", "hub")] == [("other", "a")]
    # The spec changes: the index follows, links removed included.
    cache.apply(WatchEvent("MODIFIED", topo("b", ("a",), rv="2")))
    assert [t.name for t in cache.linking_to("default", "hub")] == ["a"]
    cache.apply(WatchEvent("DELETED", topo("a", ("hub",), rv="3")))
    assert cache.linking_to("default", "hub") == []
    assert [t.name for t in cache.namespace("default")] == ["b", "hub"]


def test_node_and_block_indexes_follow_status_changes() -> None:
    cache = TopologyCache()
    cache.load([topo("a", status=alive("n0", 3)), topo("b", status=alive("n1", 3)),
                topo("c", ns="x", status=alive("n0", 5))])
    assert [t.key for t in cache.alive_on("n0")] == [("default", "a"), ("x", "c")]
    assert sorted(cache.blocks()) == [("default", 3), ("x", 5)]
    cache.apply(WatchEvent("MODIFIED", topo("a", rv="2")))  # a clean DEL: not alive, no block
    assert [t.key for t in cache.alive_on("n0")] == [("x", "c")]
    assert sorted(cache.blocks()) == [("default", 3), ("x", 5)]  # b still records 3
    cache.apply(WatchEvent("DELETED", topo("b", rv="3")))
    assert sorted(cache.blocks()) == [("x", 5)]


def test_a_miss_costs_one_get_and_the_copy_is_kept_once_newer() -> None:
    cache = TopologyCache()
    cache.load([topo("a", rv="1")])
    fresh = topo("new", rv="7")
    store = CountingStore({("default", "new"): fresh, ("default", "a"): topo("a", rv="1")})
    assert cache.read(store, "default", "a") == topo("a", rv="1") and store.gets == 0  # a hit
    assert cache.read(store, "default", "new") == fresh and store.gets == 1  # created a moment ago
    assert cache.read(store, "default", "gone") is None and store.gets == 2
    assert cache.misses == 2


def test_a_read_waits_briefly_for_a_fresh_copy_then_gets() -> None:
    cache = TopologyCache()
    cache.load([topo("a", rv="1")])
    store = CountingStore({("default", "a"): topo("a", rv="1")})
    later = topo("a", rv="2", status=alive("n1"))
    threading.Timer(0.1, lambda: cache.apply(WatchEvent("MODIFIED", later))).start()
    got = cache.read(store, "default", "a", fresh=lambda t: t.status.alive, wait=5.0)
    assert got == later and store.gets == 0  # the watch brought it: no GET
    t0 = time.monotonic()
    assert cache.read(store, "default", "a", fresh=lambda t: t.status.node == "n9", wait=0.2) == topo("a", rv="1")
    assert time.monotonic() - t0 >= 0.2 and store.gets == 1  # not fresh in time: one GET


def test_own_writes_are_read_at_once_but_events_are_diffed_against_the_watchs_copy() -> None:
    cache = TopologyCache()
    cache.load([topo("a", rv="1")])
    mine = topo("a", rv="5", status=alive("n0"))
    cache.offer(mine)
    cache.offer(topo("a", rv="3"))  # an older answer arriving late is not kept
    assert cache.get("default", "a") == mine
    assert cache.watched("default", "a") == topo("a", rv="1")
    # The watch delivers the write: the event's previous copy is the watch's (a real change).
    assert cache.apply(WatchEvent("MODIFIED", mine)) == topo("a", rv="1")
    cache.apply(WatchEvent("MODIFIED", topo("a", rv="6")))
    assert cache.get("default", "a") == topo("a", rv="6")  # the fresher copy went with it
    cache.offer(topo("zz", rv="9"))  # never seen by the watch: not kept (its event brings it)
    assert cache.get("default", "zz") is None


def test_namespace_blocks_are_the_blocks_of_the_copies_a_walk_of_the_namespace_gives() -> None:
    """`namespace_blocks` (an ADD's VNI block, issue 14 item 5) answers from the block index what a
    walk of `namespace()` answered, fresher copies of our own writes included, for every pod left
    out; seeded random states."""
    import random

    rng = random.Random(5)
    for _ in range(30):
        cache = TopologyCache()
        pods = [topo(f"p{i}", ns=rng.choice(["default", "lab"]), rv="2",
                     status=alive("n1", rng.choice([0, 0, 3, 4, 9]))) for i in range(12)]
        cache.load(pods)
        for t in rng.sample(pods, 5):  # our own writes the watch has not delivered yet
            cache.offer(replace(t, status=alive("n0", rng.choice([0, 3, 5])), resource_version="7"))
        for ns in ("default", "lab", "empty"):
            for without in ["", "nobody", *(t.name for t in pods)]:
                walked = {t.status.vni_block for t in cache.namespace(ns) if t.name != without and t.status.vni_block}
                assert cache.namespace_blocks(ns, without=without) == walked, (ns, without)


def test_offers_with_opaque_versions_are_ignored() -> None:
    cache = TopologyCache()
    cache.load([topo("a", rv="abc")])
    cache.offer(topo("a", rv="abd", status=alive("n0")))
    assert cache.get("default", "a") == topo("a", rv="abc")


# --- the one watch, against both stores ------------------------------------------------------------


@pytest.fixture(params=["sqlite", "kube"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, KubeApiServer | None]]:
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "store.db")
        yield s, None
        s.close()
        return
    from meshnet.store.kube import KubeStore

    with KubeApiServer() as server:
        server.bookmark_interval = 0.2
        k = KubeStore(kubeconfig=server.kubeconfig)
        yield k, server
        k.close()


def lists(server: KubeApiServer) -> list[Any]:
    """The LIST requests (a collection GET that is not a watch)."""
    return [r for r in server.requests
            if r.method == "GET" and r.path.endswith("/topologies") and not r.query.get("watch")]


def run_informer(store: Store, cache: TopologyCache, consumer: Callable[[WatchEvent, Topology | None], None]
                 ) -> tuple[threading.Event, threading.Thread]:
    stopping = threading.Event()
    thread = threading.Thread(target=Informer(cache, [consumer]).run, args=(store, stopping), daemon=True)
    thread.start()
    return stopping, thread


def test_the_informer_lists_once_and_follows_one_watch(store: tuple[Store, KubeApiServer | None]) -> None:
    s, server = store
    s.apply(topo("a", ("b",)))
    s.apply(topo("b", ("a",)))
    cache = TopologyCache()
    seen: list[tuple[str, str, str]] = []
    stopping, thread = run_informer(s, cache, lambda e, old: seen.append((e.type, e.topology.name,
                                                                         old.resource_version if old else "")))
    try:
        wait_for(lambda: cache.synced and len(cache) == 2)
        s.update_status("default", "a", lambda cur: alive("n0", 1))
        s.delete("default", "b")
        s.apply(topo("c", ns="elsewhere"))
        wait_for(lambda: cache.keys() == {("default", "a"), ("elsewhere", "c")})
        a = cache.get("default", "a")
        assert a is not None and a.status.alive and [t.name for t in cache.alive_on("n0")] == ["a"]
        assert [(t, n) for t, n, _ in seen] == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"),
                                                 ("DELETED", "b"), ("ADDED", "c")]
        assert seen[2][2] != ""  # the MODIFIED event came with the watch's previous copy
        if server is not None:
            # One LIST to start, one watch; bookmarks keep a quiet watch's version current.
            watches = [r for r in server.requests if r.query.get("watch")]
            assert len(lists(server)) == 1 and len(watches) == 1, server.requests
            assert watches[0].query.get("allowWatchBookmarks") == "true"
            wait_for(lambda: server.bookmarks_sent > 1)
            s.apply(topo("d"))  # the watch read its bookmarks and follows on, on the same connection
            wait_for(lambda: cache.get("default", "d") is not None)
            assert len([r for r in server.requests if r.query.get("watch")]) == 1, server.requests
    finally:
        stopping.set()
        thread.join(10)


def test_the_watch_resumes_and_relists_only_on_410() -> None:
    """The API server's 410 (SQLite's own relist, after pruning, is test_store_sqlite's)."""
    from meshnet.store import kube

    with KubeApiServer() as server:
        s = kube.KubeStore(kubeconfig=server.kubeconfig)
        try:
            resume_and_relist(s, server)
        finally:
            s.close()


def resume_and_relist(s: Store, server: KubeApiServer) -> None:
    s.apply(topo("a"))
    s.apply(topo("b"))
    cache = TopologyCache()
    events: list[tuple[str, str]] = []
    stopping, thread = run_informer(s, cache, lambda e, old: events.append((e.type, e.topology.name)))
    try:
        wait_for(lambda: len(cache) == 2)
        # Drop the watch's connection: it resumes from its version, without a LIST.
        server._httpd.close_connections()  # type: ignore[union-attr]
        s.apply(topo("c"))
        wait_for(lambda: len(cache) == 3)
        assert len(lists(server)) == 1, server.requests
        # While the watch is away (its reconnect fails once), a deletion it cannot see and a
        # compaction past its version: a 410, one relist, the deletion reported as an event.
        # Its reconnects fail until the compaction is done, however long that takes on a busy
        # machine: one that got through before it would see the deletion as an event, no relist.
        server.fail_next(1_000_000, 500, method="GET")
        server._httpd.close_connections()  # type: ignore[union-attr]
        s.delete("default", "a")
        server.compact()
        server.clear_faults()
        s.apply(topo("d"))  # after the compaction: the relisted watch follows from there
        wait_for(lambda: ("DELETED", "a") in events and cache.get("default", "d") is not None)
        assert cache.get("default", "a") is None
        assert len(lists(server)) == 2, server.requests
        s.apply(topo("e"))
        wait_for(lambda: cache.get("default", "e") is not None)
        assert len(lists(server)) == 2 and events.count(("ADDED", "b")) == 1  # b was not reported again
    finally:
        stopping.set()
        thread.join(10)


def test_status_writes_reach_the_cache_and_pods_linking_are_found(store: tuple[Store, KubeApiServer | None]
                                                                  ) -> None:
    s, _ = store
    for name, peers in (("hub", ("a", "b")), ("a", ("hub",)), ("b", ("hub",))):
        s.apply(topo(name, peers))
    cache = TopologyCache()
    stopping, thread = run_informer(s, cache, lambda e, old: None)
    try:
        wait_for(lambda: len(cache) == 3)
        written = s.update_status("default", "hub", lambda cur: alive("n1", 2))
        cache.offer(written)
        hub = cache.get("default", "hub")
        assert hub is not None and hub.status.alive  # our own write, read at once
        assert [t.name for t in cache.linking_to("default", "hub")] == ["a", "b"]
        wait_for(lambda: (w := cache.watched("default", "hub")) is not None and w.status.alive)
        assert replace(hub, source="") == replace(cache.get("default", "hub") or hub, source="")
    finally:
        stopping.set()
        thread.join(10)


# --- the daemon reads the cache, not the store ------------------------------------------------------


class NoScans(TopologyCache):
    """A cache that refuses to be walked whole: what uses it must go through its indexes."""

    def all(self) -> list[Topology]:
        raise AssertionError("walked every Topology")

    def keys(self) -> set[tuple[str, str]]:
        raise AssertionError("walked every Topology")


def test_pods_touched_finds_the_pods_concerned_through_the_indexes() -> None:
    from meshnet.daemon.reconciler import pods_touched

    everything = [topo(f"x{i}", (f"x{i + 1}",), ns=f"other{i % 10}") for i in range(2000)]
    a = topo("a", ("b",), status=alive("n0"))
    c = topo("c", ("b",), status=alive("n1"))
    old_b = topo("b", ("a", "c"))
    b = topo("b", ("a", "c", "d"), rv="2")  # its spec changed: its peers here need a pass
    cache = NoScans()
    cache.load([*everything, a, c, old_b])
    cache.apply(WatchEvent("MODIFIED", b))
    touched = pods_touched("MODIFIED", old_b, b, cache, "n0")
    mapping = {t.key: t for t in [*everything, a, c, b]}
    assert touched == pods_touched("MODIFIED", old_b, b, mapping, "n0")
    assert touched.pods == {("default", "a")}  # c is on another node


def test_a_status_write_walks_the_pods_alive_here_only_when_another_namespace_has_its_block() -> None:
    """Every status write of an alive pod carries its VNI block; looking for pods of other
    namespaces with that block walked every pod alive on the node per event (a bring-up of N
    pods: N² copies). The block index answers first; the outcome is the mapping's (a scan)."""
    from meshnet.daemon.reconciler import pods_touched

    class Counted(TopologyCache):
        walks = 0

        def alive_on(self, node: str) -> list[Topology]:
            Counted.walks += 1
            return super().alive_on(node)

    crowd = [topo(f"x{i}", (f"x{i ^ 1}",), status=alive("n0", 7)) for i in range(300)]
    old_a = topo("a", ("x1",), status=alive("n0", 7))
    a = topo("a", ("x1",), rv="2", status=replace(alive("n0", 7), links=()))
    cache = Counted()
    cache.load([*crowd, old_a])
    cache.apply(WatchEvent("MODIFIED", a))
    touched = pods_touched("MODIFIED", old_a, a, cache, "n0")
    assert touched == pods_touched("MODIFIED", old_a, a, {t.key: t for t in [*crowd, a]}, "n0")
    assert Counted.walks == 0
    # A pod of another namespace alive here with block 7: found, as before.
    y = topo("y", (), ns="other", rv="3", status=alive("n0", 7))
    cache.apply(WatchEvent("ADDED", y))
    touched = pods_touched("MODIFIED", old_a, a, cache, "n0")
    assert ("other", "y") in touched.pods and Counted.walks == 1
    assert touched == pods_touched("MODIFIED", old_a, a, {t.key: t for t in [*crowd, a, y]}, "n0")
    # Our own write in another namespace the watch has not delivered yet (not in the index): the
    # pods alive here are walked, as before.
    cache.apply(WatchEvent("DELETED", y))
    assert not cache.block_elsewhere("default", {7})
    z = topo("z", (), ns="third", rv="4")
    cache.apply(WatchEvent("ADDED", z))
    cache.offer(replace(z, resource_version="5", status=alive("n0", 7)))
    assert cache.block_elsewhere("default", {7})
    pods_touched("MODIFIED", old_a, a, cache, "n0")
    assert Counted.walks == 2


class NoLists(SqliteStore):
    def list(self, namespace: str | None = None) -> list[Topology]:
        raise AssertionError(f"LIST {namespace}")


def test_a_full_pass_and_status_read_the_cache_not_the_store(tmp_path: Path) -> None:
    from meshnet.daemon.node import NodeDaemon
    from meshnet.executor import Executor
    from meshnet.plan import NodeInfo

    store = NoLists(tmp_path / "s.db")
    store.apply(topo("a", ("b",)))
    store.apply(topo("b", ("a",)))
    store.update_status("default", "a", lambda cur: alive("n0"))
    core = NodeDaemon(NodeInfo("n0", "198.51.100.1", "lo"), store, Executor(dry_run=True), _NoPeers(),
                      grpc_port=1)
    try:
        core.state.cache.load([t for key in (("default", "a"), ("default", "b"))
                               if (t := store.get(*key)) is not None])
        core.state.cache.healthy = True
        assert core.reconcile() == 0  # a is "alive here" by the store, but set up by no sandbox here
        assert core.reconcile([("default", "a")]) == 0
        conf = '{"cniVersion": "1.1.0", "name": "m", "type": "meshnet"}'
        assert core.handle("STATUS", {"CNI_COMMAND": "STATUS"}, conf) is None
    finally:
        core.close()
        store.close()


class _NoPeers:
    def update(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no peer call expected")

    remove = update

    def close(self) -> None:
        pass


def test_catch_up_waits_for_the_watch_to_deliver_a_version() -> None:
    cache = TopologyCache()
    assert not cache.catch_up("1", 0.01)  # not filled yet
    cache.load([topo("a", rv="3")])
    assert cache.catch_up("3", 0.0) and cache.catch_up("2", 0.0)
    threading.Timer(0.1, lambda: cache.apply(WatchEvent("MODIFIED", topo("b", rv="9")))).start()
    assert not cache.catch_up("9", 0.01)
    assert cache.catch_up("9", 5.0)  # an event of any Topology moves the version on
    assert not cache.catch_up("opaque", 1.0)
