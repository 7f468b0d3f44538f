"""The SQLite store: Topologies in one local file, shared by every meshnetd process of a machine.

The emulated lab runs one daemon process per node, all on the same file, each with several threads;
hence WAL (readers never block the writer), a busy timeout (writers queue instead of failing), one
connection per thread, and optimistic concurrency on a `resource_version` column like the API
server's: `update_status` reads without locking, calls `fn`, and writes only if the row still has
the version it read (`BEGIN IMMEDIATE` takes the write lock for just that check-and-write).

Every write also appends to the `change` table; its id is the written row's new resource_version
and the cursor of `watch`, which polls it. Spec and status are stored as the CR's JSON (`to_api`),
so what comes back goes through the same parser as an API object.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from meshnet.model import API_VERSION, KIND, LinkStatus, Topology, TopologyStatus, parse_topology
from meshnet.store.base import (
    CompareFailed,
    StatusMutation,
    StoreError,
    StoreUnavailable,
    WatchEvent,
    backoff,
    merge_link_states,
    update_status_cas,
)
from meshnet.store.resync import EVENT_TYPES, resync_events, track

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000  # longer than any write holds the lock; past it the store counts as unavailable
WATCH_POLL = 0.05  # seconds between change-log polls of a watch
WATCH_BATCH = 256
# Change rows kept for watchers. A watcher further behind than this re-lists (see resync.py).
CHANGES_KEPT = 10_000
PRUNE_EVERY = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topology (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    resource_version INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS change (
    -- AUTOINCREMENT: ids never go back, even when the newest rows were rolled back or pruned.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT,  -- NULL: unchanged (a status update), so big specs are not copied per status write
    status TEXT NOT NULL
);
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _parse_spec(namespace: str, name: str, spec: str) -> Topology:
    return parse_topology({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": json.loads(spec),
    })


def _status(namespace: str, name: str, text: str) -> TopologyStatus:
    """A stored status: a file on disk is untrusted input, so it is parsed like any other status
    (a malformed one makes the pod not alive, it never makes a read fail)."""
    obj = f"{KIND} {namespace}/{name}"
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        return TopologyStatus(problems=(f"{obj}: status: not valid JSON ({e})",))
    return TopologyStatus.from_api(raw, obj)


# The watch's poll: the change log's newest and oldest ids. MIN and MAX as two subqueries, each one
# index search; together in one SELECT, SQLite scans the whole change table (282 us per poll at
# 3150 rows: most of an idle lab daemon's CPU).
NEWEST_CHANGE = "SELECT COALESCE(MAX(id), 0) FROM change"  # where a watch starts, or catches up to
WATCH_BOUNDS = "SELECT COALESCE((SELECT MAX(id) FROM change), 0), (SELECT MIN(id) FROM change)"


class _SpecCache:
    """Every stored Topology's parsed spec, by (namespace, name), valid while its spec text is.

    Parsing is most of the cost of a read (a 1500-link spec takes ~25 ms) and a spec rarely
    changes while its status does many times per pod: each stored spec text is parsed once. It
    holds every Topology the store has (a bounded cache smaller than the store re-parses all of
    them on every `list()` once the store outgrows it): entries go when their row does (a delete,
    or a read that no longer finds the row, also one another process deleted). The key is the
    spec text, not the row's version: a status write bumps the version, not the spec.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[str, Topology]] = {}
        self._lock = threading.Lock()
        self.parses = 0  # for tests: how many spec texts were parsed

    def topology(self, namespace: str, name: str, spec: str, status: str, resource_version: int) -> Topology:
        key = (namespace, name)
        entry = self._entries.get(key)
        if entry is None or entry[0] != spec:
            entry = (spec, _parse_spec(namespace, name, spec))
            with self._lock:
                self._entries[key] = entry
                self.parses += 1
        return replace(entry[1], status=_status(namespace, name, status), resource_version=str(resource_version))

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._entries.pop((namespace, name), None)

    def keep_only(self, namespace: str | None, present: set[tuple[str, str]]) -> None:
        """After a full listing of `namespace` (None: all): drop what it did not find."""
        with self._lock:
            gone = [k for k in self._entries if (namespace is None or k[0] == namespace) and k not in present]
            for k in gone:
                del self._entries[k]

    def __len__(self) -> int:
        return len(self._entries)


# Idle connections the store keeps open for its next reads and writes (more are opened while more
# threads use the store at once, and closed again after use).
KEEP_FREE = 4
# Each connection's page cache, KiB (negative cache_size: a size, not a page count).
PAGE_CACHE_KIB = 128

_backoff = functools.partial(backoff, first=0.0005, doublings=6)


class SqliteStore:
    """`Store` on the SQLite file `path` (created, with its directory, when missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._connections: list[sqlite3.Connection] = []  # every open one (close() closes them)
        self._free: list[sqlite3.Connection] = []  # those not in use, at most KEEP_FREE
        self._lock = threading.Lock()
        self._closed = False
        self._specs = _SpecCache()
        # The statuses this process wrote, by the change id they were written under, until its own
        # watch takes them: a status-only change row whose text is the one written here is this
        # status, and a watch in the writing process (the daemon's informer, whose cache holds the
        # written copy already) need not parse it again (a 1500-link status: ~12 ms of the ADD's
        # wait for its cache). Another process's watch, or another text, is parsed as ever.
        self._own: dict[int, tuple[str, TopologyStatus]] = {}
        # Set after each write this process commits: its watches look at once instead of at their
        # next poll (a daemon's ADD waits for its cache to hold its own write; other processes'
        # writes are still found by polling).
        self._written = threading.Condition()
        self._writes = 0
        # How far each watch of this process has handed its changes out (a watch hands out the next
        # only once its consumer took the last): `caught_up` waits on it. A condition of its own, so
        # that a watch's progress wakes only those waiters, never another watch.
        self._progress = threading.Condition()
        self._handed: dict[int, tuple[int, int]] = {}  # watch -> (cursor, the thread consuming it)
        self._watch_ids = itertools.count()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._write() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
        except OSError as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e

    # -- connections -------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves (IMMEDIATE for writes). check_same_thread
        # is off only so close() can close every thread's connection; each is used by one thread.
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL loses at most the last commits on power loss (never consistency) and
            # saves an fsync per commit: the difference between ~0.1 ms and ~5 ms a status update.
            db.execute("PRAGMA synchronous = NORMAL")
            # A small page cache per connection (SQLite's default is ~2 MiB each, and the pool keeps
            # up to KEEP_FREE of them plus the watch's): the rows read most are a few big status
            # texts, written again by every change, which the OS page cache serves as well.
            # meshnetd's peak RSS in the 1500-link lab: ~1 MiB lower (docs/performance.md, wave 6).
            db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        except BaseException:
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection for one read or write, from the pool. Not one per thread: meshnetd serves
        every CNI call on a thread of its own, and a connection kept per thread stayed open, with
        its page cache, after the thread was gone (one more per ADD), and each call paid for
        opening one."""
        with self._lock:
            if self._closed:
                raise StoreError(f"sqlite store {self.path} is closed")
            db = self._free.pop() if self._free else None
        if db is None:
            try:
                db = self._connect()
            except sqlite3.Error as e:
                raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
            with self._lock:
                self._connections.append(db)
        try:
            yield db
        finally:
            with self._lock:
                keep = not self._closed and not db.in_transaction and len(self._free) < KEEP_FREE
                if keep:
                    self._free.append(db)
                elif db in self._connections:
                    self._connections.remove(db)
            if not keep:
                db.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot (a read transaction) for several SELECTs."""
        with self._db() as db:
            try:
                db.execute("BEGIN")
                try:
                    yield db
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._db() as db:
            try:
                db.execute("BEGIN IMMEDIATE")  # the write lock now, not at the first write: no upgrade deadlock
                try:
                    yield db
                    db.execute("COMMIT")
                    with self._written:
                        self._writes += 1
                        self._written.notify_all()
                except BaseException:
                    if db.in_transaction:  # also after a failed COMMIT: the connection must stay usable
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections, self._free = self._connections, [], []
        for db in connections:
            db.close()

    # -- reads -------------------------------------------------------------------------------------

    def _get(self, db: sqlite3.Connection, namespace: str, name: str) -> Topology | None:
        row = db.execute("SELECT spec, status, resource_version FROM topology WHERE namespace = ? AND name = ?",
                         (namespace, name)).fetchone()
        if row is None:
            self._specs.forget(namespace, name)
            return None
        return self._specs.topology(namespace, name, *row)

    def get(self, namespace: str, name: str) -> Topology | None:
        try:
            with self._db() as db:
                return self._get(db, namespace, name)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e

    def _list(self, db: sqlite3.Connection, namespace: str | None) -> list[Topology]:
        columns = "namespace, name, spec, status, resource_version"
        if namespace is None:
            rows = db.execute(f"SELECT {columns} FROM topology ORDER BY namespace, name")
        else:
            rows = db.execute(f"SELECT {columns} FROM topology WHERE namespace = ? ORDER BY name", (namespace,))
        out = [self._specs.topology(*row) for row in rows]
        self._specs.keep_only(namespace, {t.key for t in out})
        return out

    def list(self, namespace: str | None = None) -> list[Topology]:
        try:
            with self._db() as db:
                return self._list(db, namespace)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e

    # -- writes ------------------------------------------------------------------------------------

    def _log_change(self, db: sqlite3.Connection, kind: str, namespace: str, name: str, spec: str | None,
                    status: str) -> int:
        cursor = db.execute("INSERT INTO change (type, namespace, name, spec, status) VALUES (?, ?, ?, ?, ?)",
                            (kind, namespace, name, spec, status))
        change_id = cursor.lastrowid
        assert change_id is not None
        if change_id % PRUNE_EVERY == 0:
            db.execute("DELETE FROM change WHERE id <= ?", (change_id - CHANGES_KEPT,))
        return change_id

    def apply(self, topology: Topology) -> Topology:
        """Create, or replace the spec of, a Topology; validated first (ManifestError, nothing written).

        Like the API server, status is never written here: a new Topology starts with an empty
        status, an existing one keeps its own. An unchanged spec writes nothing.
        """
        spec_api = parse_topology(topology.with_status(TopologyStatus()).to_api(), topology.source).to_api()["spec"]
        spec = _dumps(spec_api)
        ns, name = topology.namespace, topology.name
        with self._write() as db:
            row = db.execute("SELECT spec, status, resource_version FROM topology WHERE namespace = ? AND name = ?",
                             (ns, name)).fetchone()
            if row is None:
                status = _dumps({})
                version = self._log_change(db, "ADDED", ns, name, spec, status)
                db.execute("INSERT INTO topology (namespace, name, spec, status, resource_version) "
                           "VALUES (?, ?, ?, ?, ?)", (ns, name, spec, status, version))
            elif row[0] == spec:
                status, version = row[1], row[2]
            else:
                status = row[1]
                version = self._log_change(db, "MODIFIED", ns, name, spec, status)
                db.execute("UPDATE topology SET spec = ?, resource_version = ? WHERE namespace = ? AND name = ?",
                           (spec, version, ns, name))
        return self._specs.topology(ns, name, spec, status, version)

    def delete(self, namespace: str, name: str) -> bool:
        with self._write() as db:
            row = db.execute("DELETE FROM topology WHERE namespace = ? AND name = ? RETURNING spec, status",
                             (namespace, name)).fetchone()
            if row is None:
                return False
            self._log_change(db, "DELETED", namespace, name, row[0], row[1])
        self._specs.forget(namespace, name)
        return True

    def update_status(self, namespace: str, name: str, fn: StatusMutation, *,
                      known: Topology | None = None) -> Topology | None:
        return update_status_cas(namespace, name, fn, known, read=lambda: self.get(namespace, name),
                                 write=self._write_status, backoff=_backoff)

    def update_link_states(self, namespace: str, name: str, container: str, states: Sequence[LinkStatus], *,
                           known: Topology) -> Topology | None:
        # A local write is cheap and a lost round costs no round trip: the compare-and-set it is.
        return self.update_status(namespace, name, lambda cur: merge_link_states(cur, container, states),
                                  known=known)

    def _write_status(self, current: Topology, status: TopologyStatus) -> Topology | None:
        ns, name = current.namespace, current.name
        status_json = _dumps(status.to_api())
        with self._write() as db:
            row = db.execute("SELECT resource_version FROM topology WHERE namespace = ? AND name = ?",
                             (ns, name)).fetchone()
            if row is None:
                return None
            if str(row[0]) != current.resource_version:
                raise CompareFailed
            version = self._log_change(db, "MODIFIED", ns, name, None, status_json)
            db.execute("UPDATE topology SET status = ?, resource_version = ? WHERE namespace = ? AND name = ?",
                       (status_json, version, ns, name))
            # Before the commit wakes the watch. A rolled-back id may be used again by another
            # write: the text, compared when taken, tells.
            if len(self._own) >= 256:  # no watch in this process takes them
                self._own.clear()
            self._own[version] = (status_json, status)
        return replace(current, status=status, resource_version=str(version))

    # -- watch -------------------------------------------------------------------------------------

    def watch(self, namespace: str | None = None, *, stop: Callable[[], bool] = lambda: False,
              timeout: float = 1.0, on_list: Callable[[Sequence[Topology]], None] | None = None
              ) -> Generator[WatchEvent, None, None]:
        """Changes after this call (not after the first `next`): the starting point is taken now."""
        with self._read() as db:
            cursor = int(db.execute(NEWEST_CHANGE).fetchone()[0])
            known = {t.key: t for t in self._list(db, namespace)}
        if on_list is not None:
            on_list(list(known.values()))
        return self._follow(namespace, cursor, known, stop, min(timeout, WATCH_POLL))

    def _changed(self, known: dict[tuple[str, str], Topology], change_id: int, namespace: str, name: str,
                 spec: str | None, status: str) -> Topology | None:
        """The Topology a change row describes; a status-only row takes its spec from the watcher's
        last copy (else from the table). None: deleted since and never seen (its DELETED row follows)."""
        if spec is None:
            seen = known.get((namespace, name))
            if seen is not None:
                own = self._own.pop(change_id, None)
                parsed = own[1] if own is not None and own[0] == status else _status(namespace, name, status)
                return replace(seen, status=parsed, resource_version=str(change_id))
            try:
                with self._db() as db:
                    row = db.execute("SELECT spec FROM topology WHERE namespace = ? AND name = ?",
                                     (namespace, name)).fetchone()
            except sqlite3.Error as e:
                raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
            if row is None:
                return None
            spec = str(row[0])
        return self._specs.topology(namespace, name, spec, status, change_id)

    def _follow(self, namespace: str | None, cursor: int, known: dict[tuple[str, str], Topology],
                stop: Callable[[], bool], poll: float) -> Generator[WatchEvent, None, None]:
        # Its own connection: a generator may be resumed from any thread, and the thread-local ones
        # must stay free for the consumer's own store calls in between.
        try:
            db = self._connect()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
        seen_writes = self._writes
        me = next(self._watch_ids)
        try:
            while not stop() and not self._closed:
                # Every change up to `cursor` was handed out and taken: the consumer asked for more.
                with self._progress:
                    now = (cursor, threading.get_ident())
                    if self._handed.get(me) != now:
                        self._handed[me] = now
                        self._progress.notify_all()
                try:
                    db.execute("BEGIN")
                    newest, oldest = db.execute(WATCH_BOUNDS).fetchone()
                    rows = [] if newest == cursor else db.execute(
                        "SELECT id, type, namespace, name, spec, status FROM change WHERE id > ? "
                        "AND (? IS NULL OR namespace = ?) ORDER BY id LIMIT ?",
                        (cursor, namespace, namespace, WATCH_BATCH)).fetchall()
                    db.execute("COMMIT")
                except sqlite3.Error as e:
                    raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
                if newest == cursor:
                    with self._written:
                        if self._writes == seen_writes:
                            self._written.wait(poll)
                        seen_writes = self._writes
                    continue
                if oldest is not None and oldest > cursor + 1:
                    # Pruned past our cursor: changes are lost, so report the difference instead.
                    log.warning("sqlite store %s: watch fell behind the change log, re-listing", self.path)
                    with self._read() as snapshot:
                        cursor = int(snapshot.execute(NEWEST_CHANGE).fetchone()[0])
                        current = self._list(snapshot, namespace)
                    yield from resync_events(known, current)
                    continue
                # A short batch is everything up to `newest`; rows of other namespaces move us on too.
                cursor = rows[-1][0] if len(rows) == WATCH_BATCH else newest
                for change_id, kind, ns, name, spec, status in rows:
                    topology = self._changed(known, change_id, ns, name, spec, status)
                    if topology is None:
                        continue
                    event = WatchEvent(EVENT_TYPES[kind], topology)
                    if kind == "DELETED":
                        self._specs.forget(ns, name)  # the row is gone: so is its cache entry
                    track(known, event)
                    yield event
        finally:
            with self._progress:
                self._handed.pop(me, None)
                self._progress.notify_all()
            db.close()

    def caught_up(self, timeout: float) -> bool:
        """Wait until this process's watches have handed out every change committed before the call,
        by any process, and their consumers took them (at most `timeout` seconds; False: not yet).

        Other processes' writes reach a watch at its next poll (WATCH_POLL): a daemon's cache can be
        that far behind a write another node's daemon made, e.g. a peer pod's DEL a moment before
        this pod's ADD. Reading the newest change id is one index search; the watches are told to
        look now. What Kubernetes does for consistent reads from its watch cache, with etcd's
        current revision."""
        with self._read() as db:
            newest = int(db.execute(NEWEST_CHANGE).fetchone()[0])
        with self._written:  # as a write does: a watch waiting for its next poll looks now
            self._writes += 1
            self._written.notify_all()
        deadline = time.monotonic() + timeout
        me = threading.get_ident()
        with self._progress:
            # Not a watch this very thread consumes (a watch event's handler that serves an ADD):
            # it cannot move on while we wait.
            while any(handed < newest for handed, thread in self._handed.values() if thread != me):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(left)
        return True
