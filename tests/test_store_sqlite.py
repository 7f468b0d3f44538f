"""What only the SQLite store promises: one file shared by processes, WAL, durability, speed."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from meshnet.model import Link, Topology, TopologyStatus
from meshnet.store import StatusMutation, StoreError, StoreUnavailable, open_store
from meshnet.store import sqlite as sqlite_store
from meshnet.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent

# One "daemon": increments the counter in status.container_id `count` times.
INCREMENTER = """
import sys
from dataclasses import replace
from meshnet.store.sqlite import SqliteStore

store = SqliteStore(sys.argv[1])
for _ in range(int(sys.argv[2])):
    store.update_status("default", "r1", lambda t: replace(
        t.status, container_id=str(int(t.status.container_id or "0") + 1)))
store.close()
"""


def topo(name: str, namespace: str = "default") -> Topology:
    return Topology(name, namespace, (Link(1, "r2", "eth1", "eth1"),))


def set_container_id(value: str) -> StatusMutation:
    return lambda t: replace(t.status, container_id=value)


def test_processes_sharing_the_file_lose_no_update(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = SqliteStore(db)
    store.apply(topo("r1"))
    procs = [subprocess.Popen([sys.executable, "-c", INCREMENTER, str(db), "400"], cwd=REPO) for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    final = store.get("default", "r1")
    assert final is not None and final.status.container_id == "1200"
    store.close()


def test_wal_mode_and_file(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = SqliteStore(db)
    store.apply(topo("r1"))
    assert (tmp_path / "store.db-wal").exists()
    with sqlite3.connect(db) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_connections_keep_a_small_page_cache(tmp_path: Path) -> None:
    """SQLite's default (~2 MiB per connection, several pooled) showed in meshnetd's peak RSS."""
    store = SqliteStore(tmp_path / "store.db")
    with store._db() as db:
        assert db.execute("PRAGMA cache_size").fetchone()[0] == -sqlite_store.PAGE_CACHE_KIB
    store.close()


def test_reopen_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "store.db"  # the directory is created too
    store = SqliteStore(db)
    store.apply(topo("r1"))
    written = store.update_status("default", "r1",
                                  lambda t: TopologyStatus(src_ip="198.51.100.1", net_ns="/run/netns/n"))
    store.close()
    again = SqliteStore(db)
    assert again.get("default", "r1") == written
    # resourceVersions keep growing across reopens: no watcher or writer mistakes an old one for new
    later = again.update_status("default", "r1", lambda t: replace(t.status, node="n1"))
    assert later is not None and written is not None
    assert int(later.resource_version) > int(written.resource_version)
    again.close()


def test_locked_for_too_long_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)
    db = tmp_path / "store.db"
    store = SqliteStore(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            store.apply(topo("r1"))
        assert time.monotonic() - started < 2
        assert store.get("default", "r1") is None  # readers are not blocked by a writer (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.apply(topo("r1"))
    store.close()


def test_closed_store_refuses(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get("default", "r1")


def test_watch_behind_the_pruned_change_log_resyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "CHANGES_KEPT", 4)
    monkeypatch.setattr(sqlite_store, "PRUNE_EVERY", 2)
    store = SqliteStore(tmp_path / "store.db")
    store.apply(topo("gone"))
    store.apply(topo("kept"))
    with contextlib.closing(store.watch(stop=lambda: False, timeout=0.05)) as events:
        # All of this happens before the watcher polls once: its cursor falls off the pruned log.
        store.delete("default", "gone")
        store.apply(topo("new"))
        for i in range(10):
            store.update_status("default", "new", set_container_id(str(i)))
        got = [next(events) for _ in range(2)]
    assert [(e.type, e.topology.name) for e in got] == [("DELETED", "gone"), ("ADDED", "new")]
    assert got[1].topology.status.container_id == "9"
    store.close()


def test_status_update_is_fast(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    store.apply(Topology("r1", "default", tuple(Link(i, "r2", f"eth{i}", f"eth{i}") for i in range(1, 9))))
    count = 200
    started = time.perf_counter()
    for i in range(count):
        store.update_status("default", "r1", set_container_id(str(i)))
    per_update = (time.perf_counter() - started) / count
    assert per_update < 0.001, f"{per_update * 1000:.2f} ms per status update"
    store.close()


def test_open_store_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = open_store(f"sqlite://{tmp_path}/abs.db")
    assert isinstance(absolute, SqliteStore) and absolute.path == tmp_path / "abs.db"
    absolute.apply(topo("r1"))
    absolute.close()
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:rel.db")
    assert isinstance(relative, SqliteStore)
    relative.apply(topo("r1"))
    relative.close()
    assert (tmp_path / "rel.db").exists() and (tmp_path / "abs.db").exists()


@pytest.mark.parametrize("url", ["sqlite:", "sqlite://host/x.db", "sqlite:x.db?mode=ro", "etcd://x", "",
                                 "kube://host", "kube:?qps=0", "kube:?qps=fast", "kube:?token=x"])
def test_open_store_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="store URL"):
        open_store(url)


def test_list_parses_each_spec_once_however_many_topologies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parses: list[str] = []
    real = sqlite_store._parse_spec

    def counting(namespace: str, name: str, spec: str) -> Topology:
        parses.append(name)
        return real(namespace, name, spec)

    monkeypatch.setattr(sqlite_store, "_parse_spec", counting)
    writer = SqliteStore(tmp_path / "store.db")
    count = 600  # more than the 256 the cache used to hold
    for i in range(count):
        writer.apply(Topology(f"r{i}", "default", (Link(1, "peer", "eth1", "eth1"),)))
    reader = SqliteStore(tmp_path / "store.db")  # another daemon on the same file
    parses.clear()
    assert len(reader.list()) == count
    assert len(parses) == count  # its first look parses each once...
    parses.clear()
    for _ in range(3):
        assert len(reader.list()) == count
        assert len(reader.list("default")) == count
    writer.update_status("default", "r7", set_container_id("c7"))
    assert reader.get("default", "r7").status.container_id == "c7"  # type: ignore[union-attr]
    assert parses == []  # ...and never again while the specs do not change (a status write is not one)
    writer.apply(Topology("r8", "default", (Link(1, "r9", "eth9", "eth1"),)))
    assert [t.links[0].local_intf for t in reader.list() if t.name == "r8"] == ["eth9"]
    assert parses == ["r8", "r8"]  # a changed spec is parsed again, only it (by the writer and the reader)
    # Rows deleted (here by the other process) leave the cache with the next listing.
    for i in range(100):
        writer.delete("default", f"r{i}")
    assert len(reader.list()) == count - 100
    assert len(reader._specs) == count - 100
    writer.close()
    reader.close()


def test_the_watch_poll_searches_the_change_log_index_and_never_scans_it(tmp_path: Path) -> None:
    """An idle daemon polls the change log all the time: its bounds must be two index searches
    (MIN and MAX together in one SELECT made SQLite scan the whole table on every poll)."""
    store = SqliteStore(tmp_path / "s.db")
    try:
        db = sqlite3.connect(tmp_path / "s.db")
        plan = " | ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + sqlite_store.WATCH_BOUNDS))
        db.close()
    finally:
        store.close()
    assert "SCAN change" not in plan, plan
    assert plan.count("SEARCH change") == 2, plan


def test_a_watch_takes_its_own_process_status_writes_without_parsing_them(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's own watch (the daemon's informer) gets the status it wrote as written, not
    parsed again; a write from another process sharing the file, and a change row whose text is
    not the one written here (e.g. another writer reused a rolled-back id), are parsed as ever."""
    db = tmp_path / "store.db"
    store = SqliteStore(db)
    store.apply(topo("r1"))
    parsed: list[str] = []
    real = sqlite_store._status
    monkeypatch.setattr(sqlite_store, "_status", lambda ns, name, text: parsed.append(text) or real(ns, name, text))
    stop = False
    events = store.watch(stop=lambda: stop, timeout=0.2)
    mine = store.update_status("default", "r1", set_container_id("mine"))
    assert mine is not None
    parsed.clear()  # the reads before the write
    got = next(events).topology
    assert got.status == mine.status and parsed == []  # the status written, not parsed again
    other = SqliteStore(db)  # another store object: what another process's write looks like here
    theirs = other.update_status("default", "r1", set_container_id("theirs"))
    assert theirs is not None
    parsed.clear()  # the other store's own read before its write
    got = next(events).topology
    assert got.status == theirs.status and parsed == [sqlite_store._dumps(theirs.status.to_api())]
    # An id this store wrote under, whose row holds another text: parsed, not taken from memory.
    again = store.update_status("default", "r1", set_container_id("again"), known=got)
    assert again is not None
    store._own[int(again.resource_version)] = ("{}", TopologyStatus(container_id="not this"))
    parsed.clear()
    got = next(events).topology
    assert got.status.container_id == "again" and len(parsed) == 1
    stop = True
    other.close()
    store.close()


def test_short_lived_threads_leave_no_connection_open(tmp_path: Path) -> None:
    """meshnetd serves every CNI call on a new thread: the store's connections come from a pool
    and go back to it, so 50 calls leave a few open (the file's descriptors counted), not 50 (a
    connection kept per thread stayed open after its thread was gone). Several at once still work."""
    import os
    import threading

    store = SqliteStore(tmp_path / "store.db")
    store.apply(topo("r1"))

    def open_files() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "store.db")))

    before = open_files()
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            store.update_status("default", "r1", lambda t: replace(t.status, node=f"n{i}"))
            assert store.get("default", "r1") is not None
        except BaseException as e:
            errors.append(e)

    for batch in range(10):
        threads = [threading.Thread(target=call, args=(batch * 5 + i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    # One connection holds the database file and its WAL open (the -shm is mapped, not an fd).
    assert open_files() - before <= 8  # the pool's idle connections (KEEP_FREE), database and WAL each
    store.close()
    assert open_files() == 0


def _consumer(store: SqliteStore, seen: list[str], hold: threading.Event, stop: threading.Event
              ) -> threading.Thread:
    """A watch of `store` whose consumer records the names it takes (and stops taking while `hold` is
    clear), on a thread of its own, as a daemon's informer runs it."""
    events = store.watch(None, stop=stop.is_set, timeout=30.0)  # polls every min(30 s, WATCH_POLL)

    def run() -> None:
        for event in events:
            seen.append(event.topology.name)
            hold.wait(10)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_caught_up_hands_out_another_processs_write_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A write by another process (here another store on the same file) reaches a watch at its next
    poll; `caught_up` makes the watch look now and returns once its consumer took the change. The
    poll is made long, so the test fails if `caught_up` only waited for it."""
    monkeypatch.setattr(sqlite_store, "WATCH_POLL", 30.0)
    daemon, other = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    seen: list[str] = []
    hold, stop = threading.Event(), threading.Event()
    hold.set()
    thread = _consumer(daemon, seen, hold, stop)
    try:
        deadline = time.monotonic() + 10
        while not daemon._handed:  # the watch polled once and waits for its next poll
            assert time.monotonic() < deadline, "the watch never started"
            time.sleep(0.01)
        other.apply(topo("a1"))
        started = time.monotonic()
        assert daemon.caught_up(5.0)
        assert seen == ["a1"] and time.monotonic() - started < 2
        # A consumer that does not take what it was handed: not caught up, said within the timeout.
        hold.clear()
        other.apply(topo("a2"))
        other.apply(topo("a3"))
        started = time.monotonic()
        assert daemon.caught_up(0.3) is False and time.monotonic() - started < 2
        assert seen == ["a1", "a2"]
    finally:
        stop.set()
        hold.set()
        thread.join(10)
        daemon.close()
        other.close()
    assert not thread.is_alive()


def test_caught_up_without_a_watch_returns_at_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.apply(topo("r1"))
    assert store.caught_up(0.0)
    store.close()


def test_caught_up_in_a_watch_consumers_own_thread_does_not_wait_for_that_watch(tmp_path: Path) -> None:
    """A watch event's handler may serve an ADD (meshnetd adopts a sandbox the shim set up alone)
    on the informer's thread: waiting there for that watch to move on would only time out."""
    daemon, other = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    answers: list[tuple[bool, float]] = []
    stop = threading.Event()
    events = daemon.watch(None, stop=stop.is_set, timeout=30.0)

    def run() -> None:
        for event in events:
            if event.topology.name == "a1":
                other.apply(topo("a2"))  # a change this watch has not handed out yet
                started = time.monotonic()
                answers.append((daemon.caught_up(5.0), time.monotonic() - started))
                stop.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        daemon.apply(topo("a1"))  # this process's write: the watch looks at once
        thread.join(10)
    finally:
        stop.set()
        daemon.close()
        other.close()
    assert len(answers) == 1 and answers[0][0] is True and answers[0][1] < 1.0, answers
