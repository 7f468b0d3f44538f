"""Asking peer daemons to build or remove their ends of vxlan links, backing off from a peer that
failed, and remembering which pods a peer still owes far ends (for the reconciler to ask again).

A node's links go in pages of at most `PEER_PAGE` receiving pods and `PEER_PAGE_LINKS` links, one
call each with its own deadline: a hub
pod with hundreds of links towards one node costs the receiver bounded work per call (and the
receiver refuses more than `PEER_BATCH_MAX` in one call). A peer that could not be reached (no
connection, or a deadline) is not called again until its back-off is over: calls meanwhile fail at
once, the links stay in error and owed, and the reconciler asks again when the back-off ends or
the store shows the peer's daemon back.

The gRPC edge itself is handed in (`PeerClient`: gRPC in the daemon, a fake in unit tests).
"""

from __future__ import annotations

import random
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
    """A peer daemon could not be reached or failed. `unreachable`: no answer at all (no connection,
    or the deadline passed), as opposed to an answer that refused or failed the request."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class PeerSkipped(PeerError):
    """Not asked: the peer was unreachable a moment ago and its back-off is not over."""

    def __init__(self, message: str) -> None:
        super().__init__(message, unreachable=True)


class PeerClient(Protocol):
    """The gRPC edge (a fake in unit tests): one call per peer node carries all its links."""

    def update_many(self, address: str, links: Sequence[PeerLink]) -> list[str]: ...

    def remove_many(self, address: str, links: Sequence[PeerLink]) -> list[str]: ...


# Links per peer call: the receiver reads each distinct pod of a call, looks at its namespace and
# writes its status (measured ~75 ms a pod on a loaded 2-core lab machine), so a call's cost grows
# with its links; pages of 32, sent one after the other, keep each call well inside its deadline.
PEER_PAGE = 32
# ...but a page's cost also has a part per receiving pod that grows with that pod's links (its
# namespace read, its status written once per call): one pod's 1500 links in pages of 32 took
# 47 calls and ~10 s where 3 pages of 512 take well under a second. Links per page, bounded too.
PEER_PAGE_LINKS = 512
# What a receiver takes in one call (callers of this version send at most PEER_PAGE_LINKS).
PEER_BATCH_MAX = 1024

# A peer daemon that failed an update is asked again by the reconciler after 5 s, then 10, 20,
# up to 60 s, each wait shortened by up to a quarter at random (PEER_RETRY_JITTER) so that the
# nodes that lost the same peer do not all call it in the same instant; sooner once the store
# shows it is back. A peer that answered with an error (a VNI clash while two namespaces settle
# their blocks, a pod not alive there yet) is working: what failed is usually fixed within a moment
# by the peer's own pass, so its first wait is short (the doubling and the cap are the same). With
# 5 s for those too, a clash of two namespaces coming up at once kept links in error for 8-10 s.
PEER_RETRY_FIRST = 5.0
PEER_RETRY_ANSWERED_FIRST = 0.5
PEER_RETRY_MAX = 60.0
PEER_RETRY_JITTER = 0.25


@dataclass(frozen=True)
class _Failure:
    count: int  # failures in a row (one per back-off window)
    retry_at: float  # 0.0: news that the peer is back, ask at once
    unreachable: bool  # the last failure was no answer at all: calls until retry_at fail at once
    error: str
    probing: bool = False  # unreachable, wait over: one call is trying the peer, the others wait for it


class PeerBackoff:
    """When each failed peer daemon (by address: one per node) may be asked again, and whether calls
    to it fail at once meanwhile (thread-safe: CNI calls and the reconciler)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        self._failed: dict[str, _Failure] = {}

    def failed(self, address: str, *, unreachable: bool = False, error: str = "") -> None:
        """A call to `address` failed. Failures within a back-off window (concurrent ADDs that all
        met the same dead peer) count once: the wait grows per window, not per caller."""
        with self._lock:
            now = self._clock()
            old = self._failed.get(address)
            if old is not None and now < old.retry_at:
                self._failed[address] = replace(old, unreachable=unreachable, error=error or old.error)
                return
            count = (old.count if old is not None else 0) + 1
            first = PEER_RETRY_FIRST if unreachable else PEER_RETRY_ANSWERED_FIRST
            wait = min(first * 2 ** (count - 1), PEER_RETRY_MAX) * (1 - PEER_RETRY_JITTER * self._rand())
            self._failed[address] = _Failure(count, now + wait, unreachable, error)

    def answered(self, address: str) -> None:
        """The peer answered a call (whatever the answer): calls to it need not fail fast any more;
        when it may be asked again for what failed stays as it was."""
        with self._lock:
            old = self._failed.get(address)
            if old is not None and old.unreachable:
                self._failed[address] = replace(old, unreachable=False, probing=False)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failed.pop(address, None)

    def back(self, address: str) -> bool:
        """News that the peer's daemon is up again: it may be asked at once. True if it had failed."""
        with self._lock:
            old = self._failed.get(address)
            if old is None or old.retry_at == 0.0:
                return False
            self._failed[address] = replace(old, retry_at=0.0)
            return True

    def due(self, address: str) -> bool:
        with self._lock:
            entry = self._failed.get(address)
        return entry is None or self._clock() >= entry.retry_at

    def fail_fast(self, address: str) -> str:
        """Why `address` is not to be called now ("" if it may be): it did not answer a moment ago
        and its back-off is not over. Once it is over, one caller tries the peer (the one that gets
        "") and the others still fail at once until that call's outcome (`failed`/`succeeded`):
        a dead peer costs one deadline per back-off, not one per ADD that happens to come then."""
        last = ""
        with self._lock:
            entry = self._failed.get(address)
            now = self._clock()
            if entry is None or not entry.unreachable:
                return ""
            last = f" (last: {entry.error})" if entry.error else ""
            if now < entry.retry_at:
                return f"{address} unreachable, not asked again for {entry.retry_at - now:.1f} s{last}"
            if not entry.probing:
                self._failed[address] = replace(entry, probing=True)
                return ""
        return f"{address} unreachable, another call is trying it now{last}"


def wire_ip(value: object) -> str:
    """A link address as peer requests carry it: "" for none."""
    return "" if value is None else str(value)


_Page = tuple[Sequence[PeerLink], list[str] | Exception]  # a page's links and its actions or error


def paginate(links: Sequence[PeerLink]) -> list[Sequence[PeerLink]]:
    """`links` in order, cut into pages of at most PEER_PAGE distinct receiving pods and at most
    PEER_PAGE_LINKS links."""
    pages: list[Sequence[PeerLink]] = []
    start, pods = 0, set[tuple[str, str]]()
    for i, link in enumerate(links):
        key = (link.namespace, link.pod)
        if i - start >= PEER_PAGE_LINKS or (key not in pods and len(pods) >= PEER_PAGE):
            pages.append(links[start:i])
            start, pods = i, set[tuple[str, str]]()
        pods.add(key)
    if start < len(links):
        pages.append(links[start:])
    return pages


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

    def _call(self, method: Callable[[str, Sequence[PeerLink]], list[str]], address: str,
              links: Sequence[PeerLink]) -> list[str]:
        """One page to one peer, unless the peer is known unreachable (then at once PeerSkipped)."""
        why = self.backoff.fail_fast(address)
        if why:
            raise PeerSkipped(why)
        try:
            actions = method(address, links)
        except PeerError as e:
            if e.unreachable:  # at once: the next page, and other pods' calls, need not wait too
                self.backoff.failed(address, unreachable=True, error=str(e))
            else:
                self.backoff.answered(address)
            raise
        self.backoff.answered(address)
        return actions

    def _pages(self, method: Callable[[str, Sequence[PeerLink]], list[str]], address: str,
               links: Sequence[PeerLink]) -> list[_Page]:
        """`links` to one peer in pages (`paginate`), one after the other: pages sent at
        once would share the receiver's time and all finish late, each page's deadline must only
        cover its own work. A page that fails does not stop the next (it may be refused alone);
        after one that found the peer dead the rest fail at once (PeerSkipped)."""
        out: list[_Page] = []
        for page in paginate(links):
            try:
                out.append((page, self._call(method, address, page)))
            except Exception as e:  # each page's outcome is its own
                out.append((page, e))
        return out

    def _paged(self, method: Callable[[str, Sequence[PeerLink]], list[str]],
               batches: Mapping[str, Sequence[PeerLink]]) -> dict[str, list[_Page]]:
        """Each node's pages (`_pages`), the nodes in parallel: {address: [(page, actions or error)]}."""
        futures = {address: self._pool.submit(self._pages, method, address, links)
                   for address, links in batches.items()}
        return {address: fut.result() for address, fut in futures.items()}

    def build_far_ends(self, topo: Topology, plan: PodPlan) -> dict[int, str]:
        """Ask each remote peer's daemon to build its vxlan ends — the links towards one node in
        pages (`paginate`), one call each; returns {uid: error} for failures. A page the
        peer refused fails only its own links (each page is authorised on its own)."""
        if not plan.remote:
            return {}
        vnis = {p.uid: p.vni for p in plan.links if isinstance(p, VxlanPlan)}
        by_node: dict[str, list[PeerLink]] = {}
        for r in plan.remote:
            by_node.setdefault(self._remote_address(r), []).append(self.peer_link(topo, r.uid, vnis[r.uid]))
        errors: dict[int, str] = {}
        log = self.state.log
        for address, pages in self._paged(self.peers.update_many, by_node).items():
            actions: list[str] = []
            failures: list[Exception] = []
            for page, outcome in pages:
                if isinstance(outcome, Exception):  # any failure of one page must not hide the others
                    failures.append(outcome)
                    errors.update({lk.uid: f"peer update failed: {outcome}" for lk in page})
                else:
                    actions += outcome
            self._outcome(address, failures)
            if len(failures) < len(pages):
                log(event="peer-update", peer=address, links=len(actions), pages=len(pages),
                    created=actions.count("created"), updated=actions.count("updated"))
            if failures:
                skipped = all(isinstance(e, PeerSkipped) for e in failures)
                log(event="peer-update-skipped" if skipped else "peer-update-failed", peer=address,
                    pages=len(failures), error=str(failures[0]))
        return errors

    def _outcome(self, address: str, failures: Sequence[Exception]) -> None:
        """Back off from `address` after a failed call; forget it after calls that all succeeded.
        Calls not made (PeerSkipped) say nothing new about the peer."""
        made = [e for e in failures if not isinstance(e, PeerSkipped)]
        if made:
            dead = [e for e in made if isinstance(e, PeerError) and e.unreachable]
            self.backoff.failed(address, unreachable=bool(dead), error=str((dead or made)[0]))
        elif not failures:
            self.backoff.succeeded(address)

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
        for address, pages in self._paged(self.peers.remove_many, far).items():
            for _, e in pages:
                if isinstance(e, Exception):  # the far end is garbage-collected later; DEL must succeed
                    self.state.log(event="peer-remove-skipped" if isinstance(e, PeerSkipped) else "peer-remove-failed",
                                   peer=address, error=str(e))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
