"""Writing link states into pods' Topology status.

One writer (`write`): per-link states, the `skipped` list that goes with them (the links still
waiting for their peer pod), only for the sandbox that owns the status, and only when anything
changes — every write wakes every watcher in the cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from meshnet.daemon.state import NodeState
from meshnet.ends import end_report
from meshnet.model import Link, LinkStatus, Skip, Topology, TopologyStatus
from meshnet.plan import ALL_CAPABILITIES, Capabilities, Endpoint, LinkPlan, PodPlan, VethPlan, pending_reason


def end_status(lp: LinkPlan, end: Endpoint, caps: Capabilities, state: str = "up", message: str = "") -> LinkStatus:
    """A built link's status on the pod that owns `end`, with what is in force there."""
    report = end_report(end, lp.uid, caps)
    return LinkStatus(lp.uid, lp.kind, state, message, end.intf, report.state, report.impairments,
                      report.unavailable)


class LinkStatusWriter:
    def __init__(self, state: NodeState) -> None:
        self.state = state

    def write(self, topo: Topology, states: Sequence[LinkStatus], *, container: str | None = None,
              whole: bool = False, plumbing_error: str | None = None) -> None:
        """Record `states` in the pod's status, in one write, and only if anything changes.

        `whole`: they are every link's state (a plan's outcome): the pod's other recorded states go.
        Otherwise they are merged into what is recorded. `container`: the sandbox the states are
        about (default: the one `topo` shows); a newer sandbox's status is left alone.
        `plumbing_error`: replaces the pod's error text (None: kept).
        """
        if not states and not whole:
            return
        owner = topo.status.container_id if container is None else container
        if not whole and plumbing_error is None:
            # A peer's news about some links: only their entries change, which the store can write
            # without fighting the pod's own ADD or other peers over the rest of the status.
            self.state.store.update_link_states(topo.namespace, topo.name, owner, states, known=topo)
            return
        by_uid = {s.uid: s for s in states}

        def write(cur: Topology) -> TopologyStatus | None:
            if cur.status.container_id != owner:
                return None  # a newer sandbox owns the status now
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
            return None if new == cur.status else new

        self.state.store.update_status(topo.namespace, topo.name, write, known=topo)

    def write_outcome(self, topo: Topology, container: str, plan: PodPlan, errors: Mapping[int, str]) -> None:
        """A plan's outcome: every link up, in error (`errors`), or pending; the errors also
        become the pod's plumbing error."""
        caps = self.state.executor.capabilities()
        states = [end_status(lp, lp.ends[0], caps, "error" if lp.uid in errors else "up", errors.get(lp.uid, ""))
                  for lp in plan.links]
        states += [LinkStatus(p.uid, "", "pending", p.reason, "") for p in plan.pending]
        error = "; ".join(f"uid {u}: {m}" for u, m in sorted(errors.items()))
        self.write(topo, states, container=container, whole=True, plumbing_error=error)

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
