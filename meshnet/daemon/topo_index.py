"""The node-local topology index the CNI shim reads while meshnetd is down, and the pods it left.

meshnetd keeps a file listing every Topology of the cluster (``namespace/name``, with a generation
and a timestamp; format in ``meshnet.cni.offline``) current from the informer's watch of the store
(the one watch the daemon has: `meshnet.store.cache.Informer`), always
written whole (tmp file + rename). With the daemon unreachable, the shim gives a pod the index does
not list its eth0 at once and leaves a record of the sandbox; once the daemon is back, this module
"adopts" recorded sandboxes whose pod has a Topology by then: the same ADD meshnetd would have done
for the links (chained, eth0 as it is), after which the reconciler keeps them like any other pod.
Records are untrusted input (files on disk) and are validated before anything is done with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from meshnet.cni import offline, protocol
from meshnet.model import Topology
from meshnet.store.base import Store, WatchEvent
from meshnet.store.cache import TopologyCache

Handle = Callable[[str, Mapping[str, str], str], Any]
Log = Callable[..., None]
Key = tuple[str, str]

# A chained ADD with an empty eth0 result: the pod's eth0 exists already, only the links are built.
_ADOPT_CONF = json.dumps({"cniVersion": protocol.LATEST_VERSION, "name": "meshnet-adopt", "type": "meshnet",
                          "prevResult": {"cniVersion": protocol.LATEST_VERSION, "interfaces": [], "ips": []}})


class TopologyIndex:
    def __init__(self, path: str, handle: Handle, log: Log, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._handle = handle
        self._log = log
        self._clock = clock
        self._lock = threading.Lock()  # the keys and the file: the watch thread and refreshes
        self._keys: set[Key] | None = None  # None until the first full list: never write a partial index
        self._generation = 0
        self._records: dict[str, offline.Record] = {}  # container id -> record, as last read from disk
        # One lock per pod, held across an adoption's ADD and across the runtime's own ADD/DEL of the
        # pod: a DEL arriving while the sandbox is adopted waits for it (and then undoes it), and an
        # adoption after the DEL finds the record gone. Guarded by `_lock`; never removed (few pods).
        self._pod_locks: dict[Key, threading.Lock] = {}

    # --- the index ---------------------------------------------------------------------------------

    def _write(self) -> None:
        assert self._keys is not None
        self._generation += 1
        data = offline.format_index(self._keys, self._generation, self._clock())
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # a reader sees the old file or the new one, never a mix

    def refresh(self, store: Store | TopologyCache) -> None:
        """Everything from a full list (of the daemon's cache: no API call); then the recorded
        sandboxes are looked at."""
        if isinstance(store, TopologyCache):
            keys = store.keys()
            with self._lock:
                self._keys = keys
                self._write()
            self.load_records()
            with self._lock:
                wanted = {(r.namespace, r.pod) for r in self._records.values()}
            self.adopt(t for key in sorted(wanted) if (t := store.get(*key)) is not None)
            return
        topologies = store.list(None)
        with self._lock:
            self._keys = {t.key for t in topologies}
            self._write()
        self.load_records()
        self.adopt(topologies)

    def on_event(self, event: WatchEvent, _old: Topology | None) -> None:
        """An informer event: the same watch as the reconciler's (no second watch of the store)."""
        self.event(event.type, event.topology)

    def event(self, event_type: str, topo: Topology) -> None:
        with self._lock:
            if self._keys is not None:
                before = len(self._keys)
                if event_type == "DELETED":
                    self._keys.discard(topo.key)
                else:
                    self._keys.add(topo.key)
                if len(self._keys) != before:  # status writes (most events) change nothing here
                    self._write()
        if event_type != "DELETED":
            self.adopt([topo])

    # --- sandboxes the shim set up without the daemon ------------------------------------------------

    def load_records(self) -> None:
        good, bad = offline.read_records(self.path)
        for name, why in bad:
            self._log(event="pending-record-damaged", file=name, error=why)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(offline.pending_dir(self.path), name))
        with self._lock:
            self._records = {r.container_id: r for r in good}

    def _drop(self, container_id: str) -> None:
        with self._lock:
            self._records.pop(container_id, None)
        try:
            offline.remove_record(self.path, container_id)
        except OSError as e:
            self._log(event="pending-record-left", container=container_id[:12], error=str(e))

    def adopt(self, topologies: Iterable[Topology]) -> None:
        """Build the links of recorded sandboxes whose pod has a Topology now."""
        with self._lock:
            by_key: dict[Key, list[offline.Record]] = {}
            for rec in self._records.values():
                by_key.setdefault((rec.namespace, rec.pod), []).append(rec)
        if not by_key:
            return
        for topo in topologies:
            for rec in by_key.get(topo.key, ()):
                self._adopt(topo, rec)

    def _pod_lock(self, key: Key) -> threading.Lock:
        with self._lock:
            return self._pod_locks.setdefault(key, threading.Lock())

    def _adopt(self, topo: Topology, rec: offline.Record) -> None:
        with self._pod_lock(topo.key):
            with self._lock:
                if rec.container_id not in self._records:
                    return  # the runtime's DEL or a newer ADD made it stale meanwhile
            self._adopt_locked(topo, rec)

    def _adopt_locked(self, topo: Topology, rec: offline.Record) -> None:
        st = topo.status
        if not os.path.exists(rec.netns):
            self._log(event="pending-dropped", pod=topo.name, container=rec.container_id[:12], why="netns gone")
            self._drop(rec.container_id)
            return
        if st.container_id == rec.container_id and st.alive:
            self._drop(rec.container_id)  # done already
            return
        if st.container_id and st.container_id != rec.container_id and st.alive and os.path.exists(st.net_ns):
            # Another live sandbox of the pod owns it: ours is the older one, or not the pod's any more.
            self._log(event="pending-dropped", pod=topo.name, container=rec.container_id[:12],
                      why=f"owned by {st.container_id[:12]}")
            self._drop(rec.container_id)
            return
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": rec.container_id, "CNI_NETNS": rec.netns,
               "CNI_IFNAME": rec.ifname, "CNI_ARGS": f"K8S_POD_NAMESPACE={rec.namespace};K8S_POD_NAME={rec.pod}"}
        try:
            self._handle("ADD", env, _ADOPT_CONF)
        except Exception as e:  # kept: the next refresh tries again
            self._log(event="adopt-failed", pod=topo.name, container=rec.container_id[:12], error=str(e))
            return
        self._log(event="adopted", pod=topo.name, namespace=topo.namespace, container=rec.container_id[:12])
        self._drop(rec.container_id)

    def wrap(self, handle: Handle) -> Handle:
        """meshnetd's CNI handler, forgetting records the runtime's own calls make stale: a DEL of
        the sandbox, or an ADD of it or of a newer sandbox of the same pod."""

        def handled(command: str, env: Mapping[str, str], stdin: str) -> Any:
            if command not in ("ADD", "DEL"):
                return handle(command, env, stdin)
            cid = env.get("CNI_CONTAINERID", "")
            args = dict(p.partition("=")[::2] for p in env.get("CNI_ARGS", "").split(";") if p)
            key = (args.get("K8S_POD_NAMESPACE") or "default", args.get("K8S_POD_NAME", ""))
            with self._pod_lock(key):  # not while an adoption of this pod runs
                with self._lock:
                    stale = [c for c, r in self._records.items()
                             if c == cid or (command == "ADD" and (r.namespace, r.pod) == key)]
                for c in stale:
                    self._drop(c)
                return handle(command, env, stdin)

        return handled

    # --- the thread -------------------------------------------------------------------------------------

    def run(self, cache: TopologyCache, stopping: threading.Event, resync: float) -> None:
        """Once the informer's cache has its first list, and every `resync` seconds after: the whole
        index from the cache, and the recorded sandboxes looked at again. Events in between come
        from the informer (`on_event`)."""
        while not cache.wait_synced(0.5):
            if stopping.is_set():
                return
        while not stopping.is_set():
            try:
                self.refresh(cache)
            except Exception as e:
                self._log(event="topology-index-error", error=f"{type(e).__name__}: {e}")
            stopping.wait(resync)
