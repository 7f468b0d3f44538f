"""Asking peer daemons to build or remove their ends of vxlan links, backing off from a peer that
failed, and remembering which pods a peer still owes far ends (for the reconciler to ask again).

The gRPC edge itself is handed in (`PeerClient`: gRPC in the daemon, a fake in unit tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from meshnet import naming
from meshnet.daemon.state import NodeState, PodKey
from meshnet.model import Link, Topology
from meshnet.plan import PodPlan, PodState, RemoteEnd, VxlanPlan


@dataclass(frozen=True)
class PeerLink:
    """A peer request, as the receiving node sees it (`pod` is on the receiver)."""

    namespace: str
    pod: str
    peer_pod: str
    uid: int
    vni: int
    local_intf: str
    peer_intf: str
    local_ip: str
    peer_ip: str
    peer_vtep: str


class PeerError(Exception):
    """A peer daemon could not be reached or failed."""


class PeerClient(Protocol):
    """The gRPC edge (a fake in unit tests): one call per peer node carries all its links."""

    def update_many(self, address: str, links: Sequence[PeerLink]) -> list[str]: ...

    def remove_many(self, address: str, links: Sequence[PeerLink]) -> list[str]: ...


# A peer daemon that failed an update is asked again by the reconciler after 5 s, then 10, 20,
# up to 60 s (each try can wait the gRPC deadline); sooner once the store shows it is back.
PEER_RETRY_FIRST = 5.0
PEER_RETRY_MAX = 60.0


class PeerBackoff:
    """When each failed peer daemon may be asked again (thread-safe: CNI calls and the reconciler)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._failed: dict[str, tuple[int, float]] = {}  # address -> (failures in a row, retry at)

    def failed(self, address: str) -> None:
        with self._lock:
            count = self._failed.get(address, (0, 0.0))[0] + 1
            wait = min(PEER_RETRY_FIRST * 2 ** (count - 1), PEER_RETRY_MAX)
            self._failed[address] = (count, self._clock() + wait)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failed.pop(address, None)

    def back(self, address: str) -> bool:
        """News that the peer's daemon is up again: it may be asked at once. True if it had failed."""
        with self._lock:
            if address not in self._failed or self._failed[address][1] == 0.0:
                return False
            self._failed[address] = (self._failed[address][0], 0.0)
            return True

    def due(self, address: str) -> bool:
        with self._lock:
            entry = self._failed.get(address)
        return entry is None or self._clock() >= entry[1]


def wire_ip(value: object) -> str:
    """A link address as peer requests carry it: "" for none."""
    return "" if value is None else str(value)


class PeerNotifier:
    def __init__(self, state: NodeState, peers: PeerClient) -> None:
        self.state = state
        self.peers = peers
        self.backoff = PeerBackoff()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="peer")
        self._lock = threading.Lock()
        # Pods with vxlan links whose far end a peer update failed to build: {pod: peer addresses}
        # (guarded by `_lock`: written by CNI calls and the reconciler).
        self._owed: dict[PodKey, set[str]] = {}

    def address(self, vtep_ip: str) -> str:
        """The peer daemon behind a VTEP."""
        return naming.host_port(vtep_ip, self.state.grpc_port)

    def _remote_address(self, r: RemoteEnd) -> str:
        return self.address(r.peer_src_ip)

    def peer_link(self, topo: Topology, uid: int, vni: int) -> PeerLink:
        """Link `uid` of `topo` as the peer's daemon sees it."""
        link = topo.link(uid)
        assert link is not None
        return PeerLink(topo.namespace, link.peer_pod, topo.name, uid, vni, link.peer_intf, link.local_intf,
                        wire_ip(link.peer_ip), wire_ip(link.local_ip), self.state.node.vtep_ip)

    def build_far_ends(self, topo: Topology, plan: PodPlan) -> dict[int, str]:
        """Ask each remote peer's daemon to build its vxlan ends — one call per node, all its links
        in it; returns {uid: error} for failures."""
        if not plan.remote:
            return {}
        by_node: dict[str, list[int]] = {}
        for r in plan.remote:
            by_node.setdefault(self._remote_address(r), []).append(r.uid)
        vnis = {p.uid: p.vni for p in plan.links if isinstance(p, VxlanPlan)}
        futures = {address: self._pool.submit(self.peers.update_many, address,
                                              [self.peer_link(topo, uid, vnis[uid]) for uid in uids])
                   for address, uids in by_node.items()}
        errors: dict[int, str] = {}
        log = self.state.log
        for address, fut in futures.items():
            try:
                actions = fut.result()
                self.backoff.succeeded(address)
                log(event="peer-update", peer=address, links=len(actions),
                    created=actions.count("created"), updated=actions.count("updated"))
            except Exception as e:  # any failure of one peer must not hide the others
                self.backoff.failed(address)
                errors.update({uid: f"peer update failed: {e}" for uid in by_node[address]})
                log(event="peer-update-failed", peer=address, error=str(e))
        return errors

    def retry_far_ends(self, topo: Topology, plan: PodPlan, skip: Iterable[int]) -> dict[int, str]:
        """Ask the peers again for the far ends of vxlan links the status shows in `error` (a peer
        update failed): our end being in the kernel says nothing about theirs, so such a link is
        only called up once its peer's daemon has built its end. A peer daemon that failed is left
        alone for a while (PeerBackoff): one pass must not wait on it for every pod."""
        skipped = set(skip)
        failed = {s.uid: s.message for s in topo.status.links if s.state == "error" and s.uid not in skipped}
        owed = [r for r in plan.remote if r.uid in failed]
        remote = tuple(r for r in owed if self.backoff.due(self._remote_address(r)))
        errors = {r.uid: failed[r.uid] or "peer update failed" for r in owed if r not in remote}
        if remote:
            errors.update(self.build_far_ends(topo, replace(plan, remote=remote)))
        self.note_owed(topo.key, plan, errors)
        return errors

    def note_owed(self, key: PodKey, plan: PodPlan, errors: Mapping[int, str]) -> None:
        """Remember which peers still owe this pod far ends, or forget the pod."""
        owed = {self._remote_address(r) for r in plan.remote if r.uid in errors}
        with self._lock:
            if owed:
                self._owed[key] = owed
            else:
                self._owed.pop(key, None)

    def owed_due(self) -> set[PodKey]:
        """Pods owed far ends by a peer daemon that may be asked again now."""
        with self._lock:
            owed = list(self._owed.items())
        return {key for key, addresses in owed if any(self.backoff.due(a) for a in addresses)}

    def forget_except(self, here: set[PodKey]) -> None:
        """Pods gone, or not on this node any more: nothing to ask for them from here."""
        with self._lock:
            for key in [k for k in self._owed if k not in here]:
                del self._owed[key]

    def remove_far_ends(self, topo: Topology, links: Iterable[Link], peers: Mapping[str, PodState]) -> None:
        """Tell the daemons of remote peers that `topo`'s pod went: they remove their vxlan ends.
        `topo` is the status as it was before the DEL cleared it: the block the links used."""
        far: dict[str, list[PeerLink]] = {}
        for lnk in links:
            st = peers.get(lnk.peer_pod)
            if st is not None and st.alive and st.node != self.state.node.name and st.src_ip:
                block = naming.link_block(topo.namespace, topo.status.vni_block, st.vni_block)
                vni = naming.vni(topo.namespace, lnk.uid, block)
                far.setdefault(self.address(st.src_ip), []).append(self.peer_link(topo, lnk.uid, vni))
        futures = [self._pool.submit(self.peers.remove_many, address, batch) for address, batch in far.items()]
        for fut in futures:
            try:
                fut.result()
            except Exception as e:  # the far end is garbage-collected later; DEL must succeed
                self.state.log(event="peer-remove-failed", error=str(e))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
