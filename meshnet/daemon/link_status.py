"""Writing link states into pods' Topology status.

One writer (`write`): per-link states, the `skipped` list that goes with them (the links still
waiting for their peer pod), only for the sandbox that owns the status, and only when anything
changes — every write wakes every watcher in the cluster.

News about some links of a pod (a peer built or lost its far end, a reconcile pass that only
changed some links' states) is coalesced: with a `window` (meshnetd: COALESCE_SECONDS), news that
reaches a node busy with other work (CNI calls, peer requests: `working`) is gathered per pod
sandbox and goes out as ONE patch of the entries it changes, built from the freshest copy the
cache has, once the node has been idle for IDLE_SECONDS or at the latest `window` seconds after
the first news gathered. News reaching an idle node is written at once. In a rollout a pod whose
links come up one peer at a time thus costs the API about one write per window, not one per
link; the status lags the kernel by up to the window meanwhile (`lab up` waits for it to settle).
Every pod's status is written by its own node's daemon only (its ADD, its peers' requests to
that node, its reconcile passes), so this one writer sees all of a pod's news.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace

from meshnet.daemon.state import NodeState
from meshnet.ends import end_report
from meshnet.model import Link, LinkStatus, Skip, Topology, TopologyStatus
from meshnet.plan import ALL_CAPABILITIES, Capabilities, Endpoint, LinkPlan, PodPlan, VethPlan, pending_reason
from meshnet.store.base import merge_link_states
from meshnet.store.cache import newer


def end_status(lp: LinkPlan, end: Endpoint, caps: Capabilities, state: str = "up", message: str = "") -> LinkStatus:
    """A built link's status on the pod that owns `end`, with what is in force there."""
    report = end_report(end, lp.uid, caps)
    return LinkStatus(lp.uid, lp.kind, state, message, end.intf, report.state, report.impairments,
                      report.unavailable)


# How long meshnetd gathers news about one pod's links while the node is busy (CNI calls or peer
# requests being served: a rollout), counted from the first news not written yet. A node that
# goes idle writes what it gathered IDLE_SECONDS later; news that reaches an idle node with
# nothing gathered for the pod is written at once (a lone ADD's news is in the store when it returns).
COALESCE_SECONDS = 3.0
IDLE_SECONDS = 0.2

_Key = tuple[str, str, str]  # (namespace, pod, container owning the status)


class LinkStatusWriter:
    DAEMON_WINDOW = COALESCE_SECONDS  # what meshnetd sets `window` to

    def __init__(self, state: NodeState, window: float = 0.0) -> None:
        self.state = state
        # 0: news is written at once (unit tests read the store right after); meshnetd sets it.
        self.window = window
        self._cond = threading.Condition()
        # News not written yet, by pod sandbox: {uid: state} (later news of a link replaces
        # earlier), the copy it came with, and when it is due. Guarded by `_cond`.
        self._news: dict[_Key, dict[int, LinkStatus]] = {}
        self._copies: dict[_Key, Topology] = {}
        self._due: dict[_Key, float] = {}
        self._sent: dict[_Key, float] = {}  # when news for a pod sandbox was last written
        self._active = 0  # operations being served (`working`), guarded by `_cond`
        self._idle_since = 0.0  # when the last of them ended
        self._mine = threading.local()  # this thread's depth of `working`
        self._flusher: threading.Thread | None = None
        self._closed = False
        self.writes = 0  # news writes sent to the store (tests, benchmarks)
        self.skipped = 0  # news this node's freshest copy showed already

    # --- coalescing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Around a CNI call or a peer request: while any is served the node is busy, and news is
        gathered; once none is, what was gathered goes out IDLE_SECONDS later."""
        with self._cond:
            self._active += 1
        self._mine.depth = getattr(self._mine, "depth", 0) + 1
        try:
            yield
        finally:
            self._mine.depth -= 1
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._idle_since = time.monotonic()
                    self._cond.notify()

    def _busy(self) -> bool:
        """Another operation than this thread's is being served (caller holds `_cond`)."""
        return self._active - getattr(self._mine, "depth", 0) > 0

    def _queue(self, topo: Topology, owner: str, states: Sequence[LinkStatus]) -> None:
        """News for a pod goes out at once when the node is otherwise idle and none was written
        for it within IDLE_SECONDS; else it is gathered, and written together at the latest
        `window` seconds after the first news gathered (sooner once the node is idle)."""
        key = (topo.namespace, topo.name, owner)
        now = time.monotonic()
        with self._cond:
            last = self._sent.get(key)
            busy = self._busy()
            due_now = self._closed or (key not in self._due and not busy
                                       and (last is None or now - last >= IDLE_SECONDS))
            if due_now:
                self._sent[key] = now
            else:
                self._news.setdefault(key, {}).update((s.uid, s) for s in states)
                self._copies[key] = topo
                if key not in self._due:
                    self._due[key] = now + self.window
                if self._flusher is None:
                    self._flusher = threading.Thread(target=self._flush_loop, name="link-status", daemon=True)
                    self._flusher.start()
                self._cond.notify()
        if due_now:
            self._send(topo, owner, states)

    def pending(self, namespace: str, name: str) -> dict[int, LinkStatus]:
        """News gathered for a pod and not written yet, by uid (any sandbox of it)."""
        with self._cond:
            out: dict[int, LinkStatus] = {}
            for (ns, pod, _), news in self._news.items():
                if (ns, pod) == (namespace, name):
                    out.update(news)
            return out

    def _next_due(self) -> float:
        """When the first gathered news is due: its window's end, or once the node has been idle
        for IDLE_SECONDS (caller holds `_cond`; `_due` is not empty)."""
        first = min(self._due.values())
        if self._busy():
            return first
        return min(first, self._idle_since + IDLE_SECONDS)

    def _take(self, everything: bool) -> list[tuple[_Key, Topology, list[LinkStatus]]]:
        """The news that is due (or all of it), removed from the queue (caller holds `_cond`)."""
        now = time.monotonic()
        for k in [k for k, at in self._sent.items() if now - at > IDLE_SECONDS and k not in self._due]:
            del self._sent[k]  # forgotten once it no longer matters (bounded by the pods)
        idle = not self._active and now - self._idle_since >= IDLE_SECONDS
        keys = [k for k, due in self._due.items() if everything or idle or due <= now]
        out = []
        for k in keys:
            del self._due[k]
            self._sent[k] = now
            out.append((k, self._copies.pop(k), sorted(self._news.pop(k).values(), key=lambda s: s.uid)))
        return out

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._due or self._next_due() > time.monotonic()):
                    self._cond.wait(self._next_due() - time.monotonic() if self._due else None)
                batch = self._take(self._closed)
                closed = self._closed
            for (_, _, owner), topo, states in batch:
                try:
                    self._send(topo, owner, states)
                except Exception as e:  # a store failure loses this news; the next reconcile pass writes it
                    self.state.log(event="link-status-write-failed", pod=f"{topo.namespace}/{topo.name}",
                                   error=f"{type(e).__name__}: {e}")
            if closed:
                return

    def _send(self, topo: Topology, owner: str, states: Sequence[LinkStatus]) -> Topology | None:
        # The patch is built from the freshest copy this node has (its guards then rarely fail);
        # a stale one only makes the store fall back to its compare-and-set.
        known = self._freshest(topo, owner)
        if merge_link_states(known, owner, states) is None and known is not topo:
            # This node's freshest copy shows the news already (or a newer sandbox): nothing is
            # sent — as tell_veth_peers does with its copies. Confirming it with a read would cost
            # a GET per piece of news; should the copy be stale, the pod's own node converges its
            # entries anyway (its reconciler looks at links pending towards a live peer).
            self.skipped += 1
            return None
        self.writes += 1
        return self.state.remember(self.state.store.update_link_states(topo.namespace, topo.name, owner, states,
                                                                       known=known))

    def _freshest(self, topo: Topology, owner: str) -> Topology:
        """The cache's copy when it is newer than `topo` and still the same sandbox's: a write
        computed from it fails its compare less often (a stale copy costs a 409 and a GET)."""
        cached = self.state.cache.get(topo.namespace, topo.name)
        if cached is not None and cached.status.container_id == owner and newer(cached, topo):
            return cached
        return topo

    def flush(self) -> None:
        """Write every piece of news now (tests; the daemon's shutdown)."""
        with self._cond:
            batch = self._take(True)
        for (_, _, owner), topo, states in batch:
            self._send(topo, owner, states)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            flusher = self._flusher
        if flusher is not None:
            flusher.join(10)

    def write(self, topo: Topology, states: Sequence[LinkStatus], *, container: str | None = None,
              whole: bool = False, plumbing_error: str | None = None,
              take_over: Callable[[TopologyStatus], TopologyStatus] | None = None) -> Topology | None:
        """Record `states` in the pod's status, in one write, and only if anything changes; returns
        the stored Topology when it was written now (None: queued, left as it was, or gone).

        `whole`: they are every link's state (a plan's outcome): the pod's other recorded states go.
        Otherwise they are merged into what is recorded. `container`: the sandbox the states are
        about (default: the one `topo` shows); a newer sandbox's status is left alone.
        `plumbing_error`: replaces the pod's error text (None: kept). `take_over` (an ADD, with
        `whole`): makes the status sandbox `container`'s first (marks the pod alive here), whoever
        owned it — the ADD is the newest sandbox, and alive and outcome go out in one write.
        """
        if not states and not whole:
            return None
        owner = topo.status.container_id if container is None else container
        if not whole and plumbing_error is None:
            # A peer's news about some links: only their entries change, which the store can write
            # without fighting the pod's own ADD or other peers over the rest of the status.
            if self.window > 0:
                self._queue(topo, owner, states)
                return None
            return self._send(topo, owner, states)
        by_uid = {s.uid: s for s in states}
        if whole and take_over is None and self.window > 0:
            # A pass's outcome that only changes some links' states (their set and the error text
            # stay) is news like a peer's: gathered while the node is busy, with the rest.
            known = self._freshest(topo, owner)
            st = known.status
            if st.container_id == owner and plumbing_error in (None, st.plumbing_error) \
                    and {s.uid for s in st.links} == set(by_uid):
                recorded = {s.uid: s for s in st.links}
                changed = [s for s in states if recorded[s.uid] != s]
                if changed:
                    self._queue(topo, owner, changed)
                return None

        def write(cur: Topology) -> TopologyStatus | None:
            stored = cur.status
            status = stored if take_over is None else take_over(stored)
            if status.container_id != owner:
                return None  # a newer sandbox owns the status now
            cur = cur.with_status(status)
            kept = [] if whole else [s for s in cur.status.links if s.uid not in by_uid]
            links = tuple(sorted([*kept, *by_uid.values()], key=lambda s: s.uid))
            # `skipped` lists the links still waiting for their peer pod: the links' states decide.
            waiting = [] if whole else [s for s in cur.status.skipped if s.link_id not in by_uid]
            for uid, state in by_uid.items():
                link = cur.link(uid)
                if state.state == "pending" and link is not None:
                    waiting.append(Skip(link.peer_pod, uid))
            if not whole:
                waiting.sort(key=lambda s: s.link_id)
            new = replace(cur.status, links=links, skipped=tuple(waiting))
            if plumbing_error is not None:
                new = replace(new, plumbing_error=plumbing_error)
            return None if new == stored else new

        known = self._freshest(topo, owner)
        if take_over is None and known.status.container_id == owner and write(known) is None:
            # This node's freshest copy shows it already (a reconcile pass that found everything in
            # place): nothing is sent, as `_send` does for news. The store's confirming read would
            # cost a GET per pass; should the copy be stale, the watch brings the newer status and
            # with it the pass that writes.
            self.skipped += 1
            return None
        return self.state.remember(self.state.store.update_status(topo.namespace, topo.name, write, known=known))

    def write_outcome(self, topo: Topology, container: str, plan: PodPlan, errors: Mapping[int, str], *,
                      take_over: Callable[[TopologyStatus], TopologyStatus] | None = None) -> Topology | None:
        """A plan's outcome: every link up, in error (`errors`), or pending; the errors also
        become the pod's plumbing error. `take_over`: see `write`."""
        caps = self.state.executor.capabilities()
        states = [end_status(lp, lp.ends[0], caps, "error" if lp.uid in errors else "up", errors.get(lp.uid, ""))
                  for lp in plan.links]
        states += [LinkStatus(p.uid, "", "pending", p.reason, "") for p in plan.pending]
        error = "; ".join(f"uid {u}: {m}" for u, m in sorted(errors.items()))
        return self.write(topo, states, container=container, whole=True, plumbing_error=error, take_over=take_over)

    def tell_veth_peers(self, listed: Iterable[Topology], news: Mapping[str, Sequence[LinkStatus]]) -> None:
        """A veth's two ends live and die together: tell each peer pod on this node (by name in
        `news`) what became of its end — one write per pod, however many links, and none when its
        status says so already."""
        by_name = {t.name: t for t in listed}
        for name, states in news.items():
            peer = by_name[name]
            recorded = {s.uid: s for s in peer.status.links}
            waiting = {s.link_id for s in peer.status.skipped}
            if all(recorded.get(s.uid) == s and (s.uid in waiting) == (s.state == "pending") for s in states):
                continue
            self.write(peer, states)


def veth_ends_built(topo: Topology, plan: PodPlan, listed: Iterable[Topology],
                    caps: Capabilities = ALL_CAPABILITIES) -> dict[str, list[LinkStatus]]:
    """The veths `plan` built gave their peer pods (on this node, added earlier) the link they
    wait for: {peer pod: its ends' states}."""
    names = {t.name for t in listed}
    news: dict[str, list[LinkStatus]] = {}
    for lp in plan.links:
        link = topo.link(lp.uid)
        if isinstance(lp, VethPlan) and link is not None and link.peer_pod in names:
            news.setdefault(link.peer_pod, []).append(end_status(lp, lp.b, caps))
    return news


def veth_ends_lost(state: NodeState, topo: Topology, links: Iterable[Link],
                   listed: Iterable[Topology]) -> dict[str, list[LinkStatus]]:
    """`topo`'s pod goes: its veth peers on this node lose their ends with it and wait again
    (no reconcile pass is needed for that, and none runs for a clean DEL)."""
    here = {t.name for t in listed if state.alive_here(t.status)}
    news: dict[str, list[LinkStatus]] = {}
    for lnk in links:
        if lnk.peer_pod in here:
            news.setdefault(lnk.peer_pod, []).append(LinkStatus(lnk.uid, "", "pending", pending_reason(topo.name)))
    return news
