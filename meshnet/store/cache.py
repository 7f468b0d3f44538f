"""An informer-style cache of Topologies: filled by the watch's one LIST, kept current by its events.

The daemon reads Topologies from here (ADD, CHECK, STATUS, peer requests, reconcile passes and
the periodic resync) instead of asking the store, so what an ADD costs does not grow with the
cluster. One watch feeds it (`Informer`); everything the node needs to find fast is indexed:

- by namespace: the pods a plan looks at;
- by peer: (namespace, pod) -> the pods of that namespace with a link to it, so the pods a change
  concerns are found without walking every Topology;
- by node: the pods whose status says they are alive on a node (this node's pods for a pass);
- by VNI block: which namespaces recorded which block (choosing a block scans no Topology).

Reads that miss fall back to one GET (`TopologyCache.read`): a pod's Topology created a moment
before its ADD may not have reached us yet. A write's result can be `offer`ed, so this node
reads its own writes at once; the watch's own copies (what events are diffed against) are kept
apart from those, so a reconciler never mistakes an event for "no change". A copy read here may
be stale: every write is still a compare-and-set on the resourceVersion (a stale copy costs one
retry, never a lost write).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshnet.model import Topology
from meshnet.store.base import Store, WatchEvent
from meshnet.store.resync import Key, resync_events


def newer(a: Topology, b: Topology) -> bool:
    """`a` is a later version than `b`. resourceVersions are opaque to clients, but both stores
    (etcd's revision, SQLite's change id) give integers; anything else counts as not newer, so an
    offered copy is then simply not kept (the watch's copy is used, and writes compare anyway)."""
    try:
        return int(a.resource_version) > int(b.resource_version)
    except ValueError:
        return False


@dataclass(frozen=True)
class _Entry:
    """What the indexes recorded for a Topology (the copy itself may be replaced meanwhile)."""

    peers: frozenset[str]
    node: str  # "" when not alive
    block: int


def _entry(topo: Topology) -> _Entry:
    st = topo.status
    return _Entry(frozenset(lnk.peer_pod for lnk in topo.links), st.node if st.alive else "", st.vni_block)


class TopologyCache:
    """Thread-safe: the watch thread writes, every other thread reads. One lock (a condition, so a
    reader may wait for a copy to change) guards all of it; it is never held across a store call."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._by_ns: dict[str, dict[str, Topology]] = {}  # the watch's copies
        self._entries: dict[Key, _Entry] = {}
        self._linking: dict[Key, set[str]] = {}  # (namespace, peer pod) -> pods linking to it
        self._on_node: dict[str, set[Key]] = {}  # node -> pods alive there
        self._blocks: dict[int, dict[str, int]] = {}  # VNI block -> {namespace: pods recording it}
        self._fresher: dict[Key, Topology] = {}  # our own writes the watch has not delivered yet
        self._synced = threading.Event()
        self._version = 0  # the highest resourceVersion the watch delivered (0: none, or opaque)
        self.misses = 0  # reads that fell back to the store (tests, benchmarks)
        # The informer's watch follows the store (set after its list, cleared when it breaks): CNI
        # STATUS answers from this instead of asking the store each time.
        self.healthy = False

    # --- feeding -------------------------------------------------------------------------------

    def load(self, topologies: Iterable[Topology]) -> list[tuple[WatchEvent, Topology | None]]:
        """A full list (the watch's start): the events that turn the cache into it, applied, each
        with the watch's previous copy."""
        listed = list(topologies)
        with self._cond:
            known = {t.key: t for ns in self._by_ns.values() for t in ns.values()}
            out = [(ev, self._apply(ev)) for ev in resync_events(known, listed)]
            for t in listed:  # unchanged ones bring no event, but count for the version reached
                with contextlib.suppress(ValueError):
                    self._version = max(self._version, int(t.resource_version))
            self._synced.set()
            self._cond.notify_all()
        return out

    def apply(self, event: WatchEvent) -> Topology | None:
        """Take in a watch event; returns the watch's previous copy of the Topology."""
        with self._cond:
            old = self._apply(event)
            self._cond.notify_all()
        return old

    def _apply(self, event: WatchEvent) -> Topology | None:
        topo = event.topology
        with contextlib.suppress(ValueError):  # an opaque version: catch_up cannot be used
            self._version = max(self._version, int(topo.resource_version))
        ns, name = topo.key
        names = self._by_ns.get(ns)
        old = names.get(name) if names is not None else None
        self._unindex(topo.key)
        fresher = self._fresher.get(topo.key)
        if event.type == "DELETED":
            if names is not None:
                names.pop(name, None)
                if not names:
                    del self._by_ns[ns]
            self._fresher.pop(topo.key, None)
            return old
        self._by_ns.setdefault(ns, {})[name] = topo
        if fresher is not None and not newer(fresher, topo):
            del self._fresher[topo.key]  # the watch caught up with our own write
        self._index(topo)
        return old

    def _index(self, topo: Topology) -> None:
        entry = _entry(topo)
        self._entries[topo.key] = entry
        for peer in entry.peers:
            self._linking.setdefault((topo.namespace, peer), set()).add(topo.name)
        if entry.node:
            self._on_node.setdefault(entry.node, set()).add(topo.key)
        if entry.block:
            counts = self._blocks.setdefault(entry.block, {})
            counts[topo.namespace] = counts.get(topo.namespace, 0) + 1

    def _unindex(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        ns, name = key
        for peer in entry.peers:
            linking = self._linking.get((ns, peer))
            if linking is not None:
                linking.discard(name)
                if not linking:
                    del self._linking[(ns, peer)]
        if entry.node:
            here = self._on_node.get(entry.node)
            if here is not None:
                here.discard(key)
                if not here:
                    del self._on_node[entry.node]
        if entry.block:
            counts = self._blocks[entry.block]
            counts[ns] -= 1
            if not counts[ns]:
                del counts[ns]
                if not counts:
                    del self._blocks[entry.block]

    def offer(self, topo: Topology | None) -> None:
        """A copy this node just wrote (the store's answer): read from now on if it is newer than
        the watch's. The indexes follow the watch only (they decide which pods an event concerns)."""
        if topo is None:
            return
        with self._cond:
            names = self._by_ns.get(topo.namespace)
            watched = names.get(topo.name) if names is not None else None
            if watched is None or not newer(topo, watched):
                return
            kept = self._fresher.get(topo.key)
            if kept is None or newer(topo, kept):
                self._fresher[topo.key] = topo
                self._cond.notify_all()

    # --- reads ---------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """The first list is in: a miss means "not there" only after this."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def catch_up(self, version: str, timeout: float) -> bool:
        """Wait until the watch delivered `version` (a write's resourceVersion), at most `timeout`
        seconds. The watch delivers in version order, so every write before it is in the cache
        then: of two pods that come alive at once, the later write's reader sees the earlier one
        (what a fresh LIST after one's own write gave). False: timed out, not filled yet, or an
        opaque version."""
        try:
            wanted = int(version)
        except ValueError:
            return False
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._synced.is_set() and self._version >= wanted):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _copy(self, key: Key) -> Topology | None:
        names = self._by_ns.get(key[0])
        watched = names.get(key[1]) if names is not None else None
        fresher = self._fresher.get(key)
        return fresher if fresher is not None else watched

    def get(self, namespace: str, name: str) -> Topology | None:
        """The latest copy this node has (None: none, which may be a copy not arrived yet)."""
        with self._cond:
            return self._copy((namespace, name))

    def watched(self, namespace: str, name: str) -> Topology | None:
        """The watch's own copy (what the next event of this Topology is diffed against)."""
        with self._cond:
            names = self._by_ns.get(namespace)
            return names.get(name) if names is not None else None

    def read(self, store: Store, namespace: str, name: str, *,
             fresh: Callable[[Topology], bool] | None = None, wait: float = 0.0) -> Topology | None:
        """The cached copy; a miss (or a copy that is not `fresh`, after waiting up to `wait` seconds
        for the watch to bring a fresh one) is read from the store with one GET, and kept."""
        key = (namespace, name)
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                copy = self._copy(key)
                if copy is not None and (fresh is None or fresh(copy)):
                    return copy
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self.misses += 1
        got = store.get(namespace, name)
        self.offer(got)
        return got

    def namespace(self, namespace: str) -> list[Topology]:
        """The Topologies of a namespace, sorted by name."""
        with self._cond:
            names = self._by_ns.get(namespace)
            if not names:
                return []
            return [self._copy((namespace, n)) or names[n] for n in sorted(names)]

    def linking_to(self, namespace: str, pod: str) -> list[Topology]:
        """The pods of `namespace` with a link to `pod` (by the peer index: no scan)."""
        with self._cond:
            return [t for n in sorted(self._linking.get((namespace, pod), ())) if (t := self._copy((namespace, n)))]

    def alive_on(self, node: str) -> list[Topology]:
        """The pods whose watched status says they are alive on `node`."""
        with self._cond:
            return [t for k in sorted(self._on_node.get(node, ())) if (t := self._copy(k))]

    def blocks(self) -> list[tuple[str, int]]:
        """(namespace, VNI block) for every block some pod of the namespace recorded."""
        with self._cond:
            return [(ns, block) for block, counts in self._blocks.items() for ns in counts]

    def block_elsewhere(self, namespace: str, blocks: Iterable[int]) -> bool:
        """Whether a pod of another namespace may record one of `blocks`: the block index says so,
        or a fresher copy of ours in another namespace is not in it yet (then True: look)."""
        with self._cond:
            if any(ns != namespace for b in blocks for ns in self._blocks.get(b, ())):
                return True
            return any(k[0] != namespace for k in self._fresher)

    def namespace_blocks(self, namespace: str, without: str = "") -> set[int]:
        """The VNI blocks the pods of `namespace` (all but `without`) recorded, in the copies
        `namespace()` gives (a fresher copy of ours over the watch's), from the block index: no
        walk of the namespace's pods (an ADD asks this; a namespace may hold thousands)."""
        with self._cond:
            counts = {block: c[namespace] for block, c in self._blocks.items() if namespace in c}
            names = self._by_ns.get(namespace, {})
            swapped = [(namespace, n) for n in ([without] if without in names else [])]
            swapped += [k for k in self._fresher if k[0] == namespace and k[1] in names and k[1] != without]
            for key in swapped:  # the index holds the watch's copy: take it out, put ours in
                entry = self._entries.get(key)
                if entry is not None and entry.block:
                    counts[entry.block] -= 1
                if key[1] != without and (block := self._fresher[key].status.vni_block):
                    counts[block] = counts.get(block, 0) + 1
            return {block for block, n in counts.items() if n > 0}

    def all(self) -> list[Topology]:
        """Every Topology, sorted by (namespace, name)."""
        with self._cond:
            return [self._copy((ns, n)) or names[n] for ns, names in sorted(self._by_ns.items())
                    for n in sorted(names)]

    def keys(self) -> set[Key]:
        with self._cond:
            return {(ns, n) for ns, names in self._by_ns.items() for n in names}

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)


Consumer = Callable[[WatchEvent, Topology | None], None]


class Informer:
    """Feeds a `TopologyCache` from ONE watch of the store and hands every event on, with the watch's
    previous copy, to the consumers (the reconciler, the shim's topology index). The watch lists
    once to start (`on_list`), resumes from its last resourceVersion after a dropped connection, and
    lists again only when that version is gone (410) — the store's watch does all three. A watch
    that breaks anyway is started again; its list is diffed against the cache, so consumers see
    the changes they missed as events (deletions included)."""

    def __init__(self, cache: TopologyCache, consumers: Iterable[Consumer] = (),
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.cache = cache
        self.consumers = list(consumers)
        self._on_error = on_error

    def _deliver(self, event: WatchEvent, old: Topology | None) -> None:
        for consume in self.consumers:
            consume(event, old)

    def run(self, store: Store, stopping: threading.Event) -> None:
        while not stopping.is_set():
            listed: list[Topology] = []
            try:
                events = store.watch(None, stop=stopping.is_set, timeout=1.0, on_list=listed.extend)
                loaded = self.cache.load(listed)
                self.cache.healthy = True
                for ev, old in loaded:
                    self._deliver(ev, old)
                for ev in events:
                    old = self.cache.apply(ev)
                    self._deliver(ev, old)
            except Exception as e:  # the next watch's list shows what was missed
                self.cache.healthy = False
                if self._on_error is not None:
                    self._on_error(e)
                stopping.wait(1.0)
