"""What the daemon's rooms share about this node, and the locks that guard it.

Locks (never held across a store or gRPC call, except the link locks):
- `link_locks(namespace, uids)`: one lock per link, held while its kernel objects are read and
  changed, so an ADD, a peer request and a reconcile pass never interleave on one link. Taken in
  (namespace, uid) order (`link_locks_of` for several namespaces at once), so two holders never
  wait on each other in a cycle; kept only while held or waited for (`_link_locks_guard` guards
  the table). A peer Remove holds them across its store reads (see `PeerService.remove`).
- `cache` (meshnet.store.cache, its own lock): the informer's copies of every Topology, indexed.
  The watch thread writes them; CNI calls, peer requests and the reconciler read them (`cached`,
  `peers_of`, `namespace_topologies`), falling back to the store when the cache misses or has not
  been filled yet (unit tests that run no watch).
- `_adding_lock`: the pods whose ADD is being served (`adding`), read by the reconciler.
- `_applied_lock`: the impairments this daemon put in force per link end (`applied`), written
  after a successful apply by whoever built or changed the end (ADD, peer request, reconcile).
Each room keeps its own bookkeeping under its own lock (peer back-off, owed far ends, VNI clashes,
pods to re-check); those are documented where they live.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

from meshnet.daemon import netns
from meshnet.daemon.sandboxes import SandboxRecord
from meshnet.executor import Executor
from meshnet.model import Impairments, Topology, TopologyStatus
from meshnet.plan import NodeInfo, PodState
from meshnet.store.base import Store
from meshnet.store.cache import TopologyCache

Log = Callable[..., None]
PodKey = tuple[str, str]  # (namespace, pod)


def alive_on(status: TopologyStatus, node_name: str) -> bool:
    """The store says the pod runs on node `node_name` (its sandbox may still have vanished)."""
    return status.alive and status.node == node_name


class _LinkLock:
    """One link's lock, and how many callers hold or wait for it (guarded by the table's lock)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class NodeState:
    def __init__(self, node: NodeInfo, store: Store, executor: Executor, *, grpc_port: int,
                 log: Log | None = None, sandboxes: SandboxRecord | None = None,
                 cache: TopologyCache | None = None) -> None:
        self.node = node
        self.store = store
        self.executor = executor
        self.grpc_port = grpc_port
        self.log: Log = log or (lambda **_: None)
        # The namespaces of this node's pods as the CNI calls handed them (never the store's net_ns).
        self.sandboxes = sandboxes if sandboxes is not None else SandboxRecord("", self.log)
        self.cache = cache if cache is not None else TopologyCache()
        self._link_locks: dict[tuple[str, int], _LinkLock] = {}  # links in use (`_link_locks_guard`)
        self._link_locks_guard = threading.Lock()
        self._applied: dict[tuple[str, str], Impairments | None] = {}  # guarded by `_applied_lock`
        self._applied_lock = threading.Lock()
        self._adding: dict[PodKey, int] = {}  # pods whose ADD is being served here, how many (`_adding_lock`)
        self._adding_lock = threading.Lock()

    # --- "alive on this node", written once ------------------------------------------------------

    def alive_here(self, status: TopologyStatus) -> bool:
        """The store says the pod runs on this node (its sandbox may still have vanished)."""
        return alive_on(status, self.node.name)

    def netns_here(self, topo: Topology) -> str:
        """The namespace path of a pod the store puts on this node, as this daemon's own record has
        it for the same container ("" when it has none: the pod is not set up here, nothing is
        touched). The store's `status.net_ns` is never used: anyone who can write a status wrote it."""
        st = topo.status
        path = self.sandboxes.netns_of(topo.key, st.container_id)
        if not path:
            sb = self.sandboxes.get(topo.key)
            self.sandboxes.report_once(topo.key, "no sandbox of this pod set up here" if sb is None else
                                       f"container {st.container_id[:12] or 'none'} is not the one set up here"
                                       if sb.container_id != st.container_id else f"namespace {sb.netns} vanished")
        return path

    def pod_states(self, topologies: Iterable[Topology]) -> dict[str, PodState]:
        """What planning needs about each pod, by name. A pod on this node whose namespace vanished,
        or that this daemon did not set up, is not alive, whatever the store says."""
        states: dict[str, PodState] = {}
        for t in topologies:
            st = t.status
            ns_name = ""
            if self.alive_here(st):
                path = self.netns_here(t)
                try:
                    ns_name = netns.resolve(path) if path else ""
                except netns.NetnsError:
                    ns_name = ""
            alive = st.alive and (st.node != self.node.name or bool(ns_name))
            # Its links too: a veth built here gets the far end's own choices (state, impairments,
            # addresses, MAC), and a vxlan end learns that the far end is declared down.
            states[t.name] = PodState(t.name, alive, st.node, st.src_ip, ns_name, st.vni_block, st.problems,
                                      t.links)
        return states

    # --- the informer's copies ------------------------------------------------------------------

    def seen(self) -> list[Topology]:
        """A snapshot of the cache's copies of every Topology (a scan: not on a hot path)."""
        return self.cache.all()

    def cached(self, namespace: str, pod: str, *, fresh: Callable[[Topology], bool] | None = None,
               wait: float = 0.0) -> Topology | None:
        """A pod's Topology from the cache; a miss (or a copy that is not `fresh` after waiting up to
        `wait` seconds for the watch) costs one GET. The read API of the daemon's rooms."""
        return self.cache.read(self.store, namespace, pod, fresh=fresh, wait=wait)

    def remember(self, topo: Topology | None) -> Topology | None:
        """A copy this node just wrote: read from the cache from now on (the watch brings it later)."""
        self.cache.offer(topo)
        return topo

    def caught_up(self, timeout: float = 0.2) -> bool:
        """Wait (at most `timeout`) for the cache to hold every change the store had when called, when
        the store can tell that cheaply (SQLite; see `Store.caught_up`). False: it did not, and the
        cache is read as it is."""
        return self.store.caught_up(timeout) if self.cache.synced else False

    def catch_up(self, topo: Topology, timeout: float = 2.0) -> bool:
        """Wait for the cache to hold everything written before `topo` (this node's own write):
        planning from it then sees a peer that came alive first, as a LIST would have."""
        return self.cache.catch_up(topo.resource_version, timeout) if self.cache.synced else False

    def namespace_topologies(self, namespace: str) -> list[Topology]:
        """The Topologies of a namespace: from the cache once it is filled, else from the store."""
        if self.cache.synced:
            return self.cache.namespace(namespace)
        return self.store.list(namespace)

    def peers_of(self, topo: Topology) -> list[Topology]:
        """`topo` and the pods it links to, as planning needs them (their cached copies, without a
        scan; before the cache is filled, the namespace from the store)."""
        if not self.cache.synced:
            return self.store.list(topo.namespace)
        names = sorted({lnk.peer_pod for lnk in topo.links} - {topo.name})
        return [topo, *(t for n in names if (t := self.cache.get(topo.namespace, n)) is not None)]

    def all_topologies(self) -> list[Topology]:
        """Every Topology (a full pass, GC): the cache once filled, else the store."""
        if self.cache.synced:
            return self.cache.all()
        return self.store.list(None)

    # --- ADDs being served -----------------------------------------------------------------------

    @contextmanager
    def adding(self, key: PodKey) -> Iterator[None]:
        """An ADD of this pod is being served: it builds links (a veth's far end in a peer's
        namespace included) before its one status write says the pod is alive."""
        with self._adding_lock:
            self._adding[key] = self._adding.get(key, 0) + 1
        try:
            yield
        finally:
            with self._adding_lock:
                left = self._adding.pop(key) - 1
                if left:
                    self._adding[key] = left

    def add_in_flight(self, key: PodKey) -> bool:
        with self._adding_lock:  # read by the reconcile thread, written by the CNI threads
            return key in self._adding

    # --- per-link serialisation ------------------------------------------------------------------

    def link_locks(self, namespace: str, uids: Iterable[int]) -> ExitStack:
        """Serialise work per link (sorted, so two holders never wait on each other in a cycle).

        A link's lock exists while someone holds or waits for it: the table follows the links in
        use, not every (namespace, uid) this node ever served (it used to keep those for the
        daemon's life, ~200 bytes each, whatever the churn of namespaces)."""
        return self.link_locks_of((namespace, uid) for uid in uids)

    def link_locks_of(self, links: Iterable[tuple[str, int]]) -> ExitStack:
        """`link_locks` for links of any namespaces, (namespace, uid) each: taken in one order,
        (namespace, uid) sorted, of which each single namespace's order is a part."""
        keys = sorted(set(links))
        with self._link_locks_guard:
            using: list[tuple[tuple[str, int], _LinkLock]] = []
            for key in keys:
                entry = self._link_locks.get(key)
                if entry is None:
                    entry = self._link_locks[key] = _LinkLock()
                entry.users += 1
                using.append((key, entry))
        held = 0

        def release() -> None:
            for _, entry in reversed(using[:held]):
                entry.lock.release()
            with self._link_locks_guard:
                for key, entry in using:
                    entry.users -= 1
                    if not entry.users:  # nobody holds or waits for it: a later user makes a new one
                        del self._link_locks[key]

        stack = ExitStack()
        stack.callback(release)
        try:
            for _, entry in using:
                entry.lock.acquire()
                held += 1
        except BaseException:
            stack.close()
            raise
        return stack

    def link_locks_in_use(self) -> int:
        """How many links have a lock now (held or waited for): 0 on an idle node."""
        with self._link_locks_guard:
            return len(self._link_locks)

    # --- impairments in force per link end ------------------------------------------------------

    def applied(self) -> dict[tuple[str, str], Impairments | None]:
        """A snapshot of {(netns, intf): impairments put in force} (kernel.Applied)."""
        with self._applied_lock:
            return dict(self._applied)

    def record_applied(self, ends: Mapping[tuple[str, str], Impairments | None]) -> None:
        with self._applied_lock:
            self._applied.update(ends)

    def forget_applied(self, ns_name: str) -> None:
        """The pod's namespace is gone or its links removed: nothing is in force there any more."""
        with self._applied_lock:
            for key in [k for k in self._applied if k[0] == ns_name]:
                del self._applied[key]
