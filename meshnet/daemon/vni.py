"""VNI blocks: which block a pod records as it comes alive, who gives a shared block up, and the
bookkeeping of passes that met a clash (naming.py has the rules; this applies them to the store)."""

from __future__ import annotations

import threading
from dataclasses import replace

from meshnet import naming
from meshnet.daemon.state import NodeState, PodKey
from meshnet.model import Topology, TopologyStatus

# How long an ADD waits, in steps, for a VNI-block clash with another namespace to be settled.
VNI_CLASH_PAUSES = (0.1, 0.2, 0.4, 0.8, 1.0)
MAX_CLASH_RETRIES = 10


class VniBlocks:
    def __init__(self, state: NodeState) -> None:
        self.state = state
        self._lock = threading.Lock()
        # Pods whose pass hit a VNI clash, with how often in a row (guarded by `_lock`): the other
        # namespace's pod is moving to another block, so they are worth another pass soon.
        self._clashes: dict[PodKey, int] = {}

    def choose(self, topo: Topology) -> int:
        """The VNI block `topo`'s pod records as it comes alive: its namespace's, as the other pods
        of the namespace recorded it, or a block no other namespace uses (naming.choose_vni_block).
        Read from the cache's block index (no API call, and no walk of the namespace's pods on the
        ADD path); from the store while the cache is not filled (unit tests that run no watch)."""
        if self.state.cache.synced:
            own = [*self.state.cache.namespace_blocks(topo.namespace, without=topo.name), topo.status.vni_block]
        else:
            own = [t.status.vni_block for t in self.state.store.list(topo.namespace) if t.key != topo.key]
            own.append(topo.status.vni_block)
        return naming.choose_vni_block(topo.namespace, own, self._others(topo.namespace))

    def _others(self, namespace: str) -> list[tuple[str, int]]:
        """(namespace, block) recorded by other namespaces: the cache's block index (no walk of
        every Topology); the store while the cache is not filled (unit tests that run no watch)."""
        if not self.state.cache.synced:
            return [(t.namespace, t.status.vni_block) for t in self.state.store.list(None)
                    if t.namespace != namespace and t.status.vni_block]
        return [(ns, b) for ns, b in self.state.cache.blocks() if ns != namespace]

    def lost(self, topo: Topology) -> bool:
        """The pod's recorded block is also another namespace's, which keeps it (naming.block_lost)."""
        block = topo.status.vni_block
        return bool(block) and naming.block_lost(
            topo.namespace, block, self._others(topo.namespace))

    def move(self, topo: Topology) -> Topology:
        """Record another VNI block for a pod whose block a namespace with a smaller name also
        recorded (both came up at once); the pass that follows rebuilds its vxlan links with it, and
        the status change makes its peers' daemons rebuild their ends."""
        old, new = topo.status.vni_block, self.choose(topo)
        container = topo.status.container_id

        def move(cur: Topology) -> TopologyStatus | None:
            if cur.status.container_id != container or cur.status.vni_block != old:
                return None
            return replace(cur.status, vni_block=new)

        self.state.log(event="vni-block-moved", pod=topo.name, namespace=topo.namespace, old=old, new=new)
        return self.state.store.update_status(topo.namespace, topo.name, move, known=topo) or topo

    def move_if_lost(self, topo: Topology) -> Topology:
        return self.move(topo) if self.lost(topo) else topo

    # --- passes that met a clash -----------------------------------------------------------------

    def clashed(self, key: PodKey) -> None:
        with self._lock:
            self._clashes[key] = self._clashes.get(key, 0) + 1

    def settled(self, key: PodKey) -> None:
        with self._lock:
            self._clashes.pop(key, None)

    def retries_due(self) -> set[PodKey]:
        """Pods whose last pass met a clash, at most MAX_CLASH_RETRIES passes in a row (after that
        the periodic resync and new events look at them)."""
        with self._lock:
            due = {key for key, count in self._clashes.items() if count <= MAX_CLASH_RETRIES}
            for key in [k for k, c in self._clashes.items() if c > MAX_CLASH_RETRIES]:
                del self._clashes[key]
        return due

    def forget_except(self, here: set[PodKey]) -> None:
        """Pods gone, or not on this node any more: nothing to retry for them here."""
        with self._lock:
            for key in [k for k in self._clashes if k not in here]:
                del self._clashes[key]
