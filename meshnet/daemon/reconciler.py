"""Converging this node's pods with the store, level-triggered: the store's desired links against
the kernel, after a crash, a restart, a missed event or a hot change alike.

Two halves: `pods_touched` (pure) sorts a watch event into the pods it concerns; `Reconciler`
acts on events (keeps the watch's copies, removes the links of a deleted Topology, hears that a
peer daemon is back) and runs the passes. The loop that drives it is `main.ReconcileLoop`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from meshnet import naming
from meshnet.command import Command
from meshnet.daemon import kernel, netns
from meshnet.daemon.link_status import LinkStatusWriter
from meshnet.daemon.peer_client import PeerNotifier
from meshnet.daemon.state import NodeState, PodKey, alive_on
from meshnet.daemon.vni import VniBlocks
from meshnet.executor import ExecError
from meshnet.model import Topology, TopologyStatus
from meshnet.plan import Capabilities, PodPlan, plan_pod


@dataclass(frozen=True)
class Touched:
    """What a watch event means for this node."""

    pods: frozenset[PodKey]  # local pods worth a pass
    # Of those, the ones queued only because their status looked unsettled: looked at again just
    # before the pass, since the ADD that woke them usually settles them first (no kernel read).
    if_unsettled: frozenset[PodKey]
    vtep_heard: str = ""  # a daemon wrote this pod's status: the daemon behind this VTEP is up


class Copies(Protocol):
    """The copies `pods_touched` looks things up in: the informer's cache (indexed), or a mapping."""

    def get(self, namespace: str, name: str) -> Topology | None: ...

    def linking_to(self, namespace: str, pod: str) -> list[Topology]: ...

    def alive_on(self, node: str) -> list[Topology]: ...

    def block_elsewhere(self, namespace: str, blocks: Iterable[int]) -> bool: ...


class MappingCopies:
    """`Copies` over a plain mapping (scans: for tests and small callers)."""

    def __init__(self, seen: Mapping[PodKey, Topology]) -> None:
        self._seen = seen

    def get(self, namespace: str, name: str) -> Topology | None:
        return self._seen.get((namespace, name))

    def linking_to(self, namespace: str, pod: str) -> list[Topology]:
        return [t for t in self._seen.values()
                if t.namespace == namespace and any(lnk.peer_pod == pod for lnk in t.links)]

    def alive_on(self, node: str) -> list[Topology]:
        return [t for t in self._seen.values() if alive_on(t.status, node)]

    def block_elsewhere(self, namespace: str, blocks: Iterable[int]) -> bool:
        wanted = set(blocks)
        return any(t.namespace != namespace and t.status.vni_block in wanted for t in self._seen.values())


def _unsettled(topo: Topology, seen: Copies, peer: str = "") -> bool:
    """With `peer`: links of a local pod towards it that its status shows pending or in error.
    Without: links pending although their peer is alive (a status written from a plan older
    than the peer's ADD). Reconciling them again is harmless: an unchanged outcome writes
    nothing, so this cannot feed itself."""
    peers = {lnk.uid: lnk.peer_pod for lnk in topo.links}
    for s in topo.status.links:
        pod = peers.get(s.uid, "")
        if peer:
            if pod == peer and s.state in ("pending", "error"):
                return True
            continue
        copy = seen.get(topo.namespace, pod)
        if s.state == "pending" and copy is not None and copy.status.alive:
            return True
    return False


def pods_touched(event_type: str, old: Topology | None, topo: Topology,
                 seen: Copies | Mapping[PodKey, Topology], node_name: str) -> Touched:
    """Pods of node `node_name` a store change concerns. `old`: the watch's previous copy of the
    Topology; `seen`: every copy, this event's included (a deleted one gone) — the informer's
    cache, whose indexes find the pods concerned without walking every Topology. Status writes
    that only record link states (ours included) concern nobody, so reconciling never feeds itself."""
    if isinstance(seen, Mapping):
        seen = MappingCopies(seen)
    deleted = event_type == "DELETED"
    spec_changed = old is None or old.links != topo.links or deleted
    # A clean DEL (status emptied) removed its links itself — the far ends of veths die with
    # them, remote vxlan ends were told — so its peers need no pass; a crash or a move does.
    clean_del = event_type == "MODIFIED" and topo.status == TopologyStatus()
    moved = (old is not None and old.status.alive and not clean_del and (not topo.status.alive or
             (old.status.net_ns, old.status.node) != (topo.status.net_ns, topo.status.node)))
    # Only daemons write statuses: a write about a pod on a node whose daemon failed us is news
    # that it is back, so the far ends held back for it may be asked for again at once.
    heard = (topo.status.src_ip if not deleted and topo.status.src_ip and (old is None or old.status != topo.status)
             else "")
    out: set[PodKey] = set()
    if_unsettled: set[PodKey] = set()
    old_block = old.status.vni_block if old is not None else 0
    new_block = topo.status.vni_block if not deleted else 0
    # A pod coming alive or going is handled below like before; a block that changes while it
    # stays alive (it moved) changes its links' VNIs, so its peers need a pass too.
    block_changed = bool(old_block and new_block and old_block != new_block)
    blocks = {new_block, old_block} - {0}
    # Asked first of the block index: every status write of an alive pod carries its block, and
    # walking every pod alive on the node for each made the events of a bring-up quadratic.
    if (new_block or (old_block and old_block != new_block)) and seen.block_elsewhere(topo.namespace, blocks):
        # VNI blocks are per namespace: a pod of another namespace may have to give up the block
        # this one recorded (naming.block_lost), or may have been waiting for the one it left.
        for other in seen.alive_on(node_name):
            if other.namespace != topo.namespace and other.status.vni_block in {new_block, old_block} - {0}:
                out.add(other.key)
    if not deleted and alive_on(topo.status, node_name) and (spec_changed or _unsettled(topo, seen)):
        out.add(topo.key)
        if not spec_changed:
            if_unsettled.add(topo.key)
    for other in seen.linking_to(topo.namespace, topo.name):
        if alive_on(other.status, node_name):
            # A peer that came alive (or changed at all) is worth another look for links
            # still pending or in error towards it: its ADD may have raced with ours.
            if spec_changed or moved or block_changed:  # a new block: the links' VNIs change
                out.add(other.key)
            elif _unsettled(other, seen, topo.name):
                out.add(other.key)
                if_unsettled.add(other.key)
    return Touched(frozenset(out), frozenset(if_unsettled), heard)


def _forget_vanished(container_id: str) -> Callable[[Topology], TopologyStatus | None]:
    """A status mutation: the pod's netns is gone (crash, reboot), so it is not alive any more."""

    def fn(cur: Topology) -> TopologyStatus | None:
        if cur.status.container_id != container_id:
            return None
        return TopologyStatus(plumbing_error=f"network namespace {cur.status.net_ns} vanished")

    return fn


class Reconciler:
    def __init__(self, state: NodeState, blocks: VniBlocks, peers: PeerNotifier,
                 link_status: LinkStatusWriter) -> None:
        self.state = state
        self.blocks = blocks
        self.peers = peers
        self.link_status = link_status
        # Pods queued only because their status looked unsettled (Touched.if_unsettled): skipped
        # at the pass if their status has settled by then. Guarded by `_lock` (watch and pass).
        self._skip_if_settled: set[PodKey] = set()
        self._failed: set[PodKey] = set()  # pods whose last pass raised (guarded by `_lock`)
        self._lock = threading.Lock()
        # The kernel views of the pass running on this thread (kernel.PassViews), and how many
        # namespaces the last pass read (the tests count them).
        self._pass = threading.local()
        self.last_pass_reads = 0

    # --- events ----------------------------------------------------------------------------------

    def on_store_event(self, event_type: str, topo: Topology, old: Topology | None) -> set[PodKey]:
        """Take in a watch event (the cache has it already; `old`: the watch's previous copy); returns
        the pods of this node to reconcile for it. A Topology deleted while its pod runs here loses
        meshnet's links at once."""
        state = self.state
        if event_type == "DELETED":
            if old is not None and state.alive_here(old.status):
                self._remove_all(old)
        elif topo.status.problems and (old is None or old.status.problems != topo.status.problems):
            # A forged or corrupt status: the pod counts as not alive (model.TopologyStatus).
            state.log(event="status-refused", pod=f"{topo.namespace}/{topo.name}",
                      problems=list(topo.status.problems))
        touched = pods_touched(event_type, old, topo, state.cache, state.node.name)
        if touched.vtep_heard:
            address = self.peers.address(touched.vtep_heard)
            if self.peers.backoff.back(address):
                state.log(event="peer-back", peer=address, pod=topo.name)
        with self._lock:
            self._skip_if_settled |= touched.if_unsettled
            self._skip_if_settled -= touched.pods - touched.if_unsettled
        return set(touched.pods)

    def _remove_all(self, topo: Topology) -> None:
        """A Topology deleted while its pod runs: the pod keeps eth0 and loses meshnet's links (those
        in meshnet's link group, in the namespace this daemon recorded for it)."""
        path = self.state.netns_here(topo)
        if not path:
            return
        ns_name = netns.resolve(path)
        with self.state.link_locks(topo.namespace, (lnk.uid for lnk in topo.links)):
            self.state.executor.run_best_effort(
                [Command(ns_name, ("link", "del", "group", str(naming.LINK_GROUP)))])
        self.state.log(event="topology-deleted", pod=topo.name)

    def take_retries(self) -> set[PodKey]:
        """Pods to look at again now: their last pass met a VNI clash, or a peer daemon that owes
        them far ends may be asked again."""
        due = self.blocks.retries_due() | self.peers.owed_due()
        with self._lock:
            due |= self._failed
            self._failed = set()
            self._skip_if_settled -= due  # they are looked at, whatever their status seems to say
        return due

    # --- passes ----------------------------------------------------------------------------------

    def _settled_since_queued(self, topo: Topology) -> bool:
        with self._lock:
            if topo.key not in self._skip_if_settled:
                return False
            self._skip_if_settled.discard(topo.key)
        peers = {lnk.uid: lnk.peer_pod for lnk in topo.links}

        def peer_alive(uid: int) -> bool:
            peer = self.state.cache.get(topo.namespace, peers.get(uid, ""))
            return peer is not None and peer.status.alive

        # News this node gathered and has not written yet (link_status) counts: the link was just
        # built here, its state goes out with the pod's next write.
        gathered = self.link_status.pending(topo.namespace, topo.name)
        return not any(gathered.get(s.uid, s).state in ("pending", "error") and peer_alive(s.uid)
                       for s in topo.status.links)

    def _local_pods(self, wanted: set[PodKey] | None) -> tuple[list[Topology], set[PodKey]]:
        """The pods of a pass (all alive here, or those `wanted`), and every pod alive here: from the
        cache's node index (no API call, no walk of the cluster), or from the store while the cache
        is not filled (unit tests that run no watch)."""
        state = self.state
        if state.cache.synced:
            local = state.cache.alive_on(state.node.name)
            here = {t.key for t in local}
            if wanted is None:
                return local, here
            return [t for key in sorted(wanted) if (t := state.cache.get(*key)) is not None], here
        topologies = state.store.list(None)
        here = {t.key for t in topologies if state.alive_here(t.status)}
        return [t for t in topologies if wanted is None or t.key in wanted], here

    def reconcile(self, only: Iterable[PodKey] | None = None) -> int:
        """Converge the pods alive on this node (all, or those in `only`); returns links changed.
        Each namespace's kernel view is read once for the whole pass (kernel.PassViews)."""
        state = self.state
        wanted = set(only) if only is not None else None
        topologies, here = self._local_pods(wanted)
        changed = 0
        self.peers.forget_except(here)
        self.blocks.forget_except(here)
        self._pass.views = views = kernel.PassViews(state.executor)
        try:
            if wanted is None:
                views.prefetch(self._namespaces(topologies))
            for topo in topologies:
                if wanted is not None and self._settled_since_queued(topo):
                    continue
                if state.alive_here(topo.status):
                    try:
                        changed += self.reconcile_pod(topo, state.peers_of(topo))
                    except Exception as e:  # one pod's trouble never stops the pass for the others (issue 13)
                        state.log(event="reconcile-pod-error", pod=f"{topo.namespace}/{topo.name}",
                                  error=f"{type(e).__name__}: {e}")
                        with self._lock:
                            self._failed.add(topo.key)  # looked at again at the loop's next turn
        finally:
            self.last_pass_reads = self._pass.views.reads
            self._pass.views = None
        return changed

    def _namespaces(self, topologies: Iterable[Topology]) -> list[str]:
        """The namespaces of the pods set up here: what a full pass reads (their veth peers are
        among them)."""
        out = []
        for topo in topologies:
            if self.state.alive_here(topo.status) and (path := self.state.netns_here(topo)):
                try:
                    out.append(netns.resolve(path))
                except netns.NetnsError:
                    continue  # vanished: its pass says so
        return out

    def reconcile_pod(self, topo: Topology, namespace_topologies: Iterable[Topology]) -> int:
        state = self.state
        st = topo.status
        path = state.netns_here(topo)
        if not path:
            sb = state.sandboxes.get(topo.key)
            if sb is None or sb.container_id != st.container_id:
                return 0  # not set up here (or a forged status): reported, nothing touched
            state.log(event="stale-netns", pod=topo.name, net_ns=sb.netns)
            state.sandboxes.drop(topo.key, sb.container_id)
            state.sandboxes.release(sb)
            state.store.update_status(topo.namespace, topo.name, _forget_vanished(st.container_id))
            if netns.release(st.net_ns):  # our bind mount would keep the dead sandbox's namespace alive
                state.log(event="netns-released", pod=topo.name, net_ns=st.net_ns)
            return 0
        topo = self.blocks.move_if_lost(topo)
        st = topo.status
        ns_name = netns.resolve(path)
        plan = plan_pod(topo, ns_name, state.node, state.pod_states(namespace_topologies))
        errors: dict[int, str] = {}
        uids = {p.uid for p in plan.links} | {s.uid for s in st.links}
        views = getattr(self._pass, "views", None) or kernel.PassViews(state.executor)
        names = [ns_name, *(e.netns for p in plan.links for e in p.ends)]
        with state.link_locks(topo.namespace, uids):
            caps = state.executor.capabilities()
            view, earlier = views.read(names)
            stale, todo = self._work(topo, ns_name, plan, view, caps)
            if earlier and (stale or todo or self._would_call_up(topo, plan)):
                # Part of the view came from an earlier pod's read, before these locks: act only on
                # a fresh one (another ADD or peer may have changed those namespaces since). Writing
                # "up" for a link the status does not show up is acting too: an end that went since
                # that read (a failed build's rollback) would be recorded up with nothing in the
                # kernel. The work is worked out again only if the kernel changed: rendering 500
                # missing links twice was a third of a restarted daemon's first pass.
                fresh, _ = views.read(names, fresh=True)
                if fresh != view:
                    view = fresh
                    stale, todo = self._work(topo, ns_name, plan, view, caps)
            if stale or todo:
                views.forget(names)  # changed below: a later pod of the pass reads them again
            if stale:
                for problem in state.executor.run_best_effort(stale):
                    state.log(event="gc-problem", pod=topo.name, error=problem)
            if todo:
                try:
                    state.executor.apply(todo)
                except ExecError as e:
                    state.log(event="reconcile-failed", pod=topo.name, error=str(e))
                    errors = {c.uid: str(e) for c in todo}
                    if kernel.vni_clash(e):
                        self.blocks.clashed(topo.key)
                else:
                    self.blocks.settled(topo.key)
            if not errors:
                state.record_applied(kernel.in_force_after(plan.links, caps))
        if stale or todo:
            state.log(event="reconciled", pod=topo.name, removed=[c.argv[2] for c in stale],
                      changed=sorted({c.uid for c in todo}))
        errors.update(self.peers.retry_far_ends(topo, plan, errors))
        self.link_status.write_outcome(topo, st.container_id, plan, errors)
        return len({c.uid for c in todo}) + len(stale)

    def _would_call_up(self, topo: Topology, plan: PodPlan) -> bool:
        """The pass's outcome would record a link up that the pod's status (with the news gathered
        for it and not written yet) does not show up."""
        recorded = {s.uid: s.state for s in topo.status.links}
        if any(recorded.get(lp.uid) != "up" for lp in plan.links):
            return True
        # Gathered news is looked at only then: an idle node has none, a busy one many pods of it.
        gathered = self.link_status.pending(topo.namespace, topo.name)
        return any(gathered[lp.uid].state != "up" for lp in plan.links if lp.uid in gathered)

    def _work(self, topo: Topology, ns_name: str, plan: PodPlan, view: kernel.KernelView,
              caps: Capabilities) -> tuple[list[Command], list[Command]]:
        """What the pass would do on this view: interfaces to remove, and commands to converge."""
        pod_view = view.get(ns_name, {})
        stale = kernel.garbage(topo, ns_name, pod_view, self._orphans(topo, plan, pod_view))
        return stale, kernel.differences(plan.links, view, caps, self.state.applied())

    def _orphans(self, topo: Topology, plan: PodPlan, view: Mapping[str, Mapping[str, Any]]) -> set[str]:
        """Interfaces of links whose peer is gone (pending): a veth or vxlan end left towards a pod
        that died or moved away. The peers are read again first, so a peer that came alive after
        this pass listed the store keeps the end its ADD just built (its event brings another pass)."""
        names = {lnk.uid: lnk.local_intf for lnk in topo.links}
        # A peer whose ADD is being served here built its veth (this end too) before the write that
        # says it is alive: the store still shows it dead until then, and the end is its new one.
        adding = self.state.add_in_flight
        # By link, not by peer: two links to the same pod (parallel links, a LAG) are two ends.
        left = {names[p.uid]: p.peer_pod for p in plan.pending
                if kernel.link_kind(view.get(names[p.uid])) in ("veth", "vxlan")
                and not adding((topo.namespace, p.peer_pod))}
        if not left:
            return set()
        store = self.state.store
        peers = set(left.values())  # each read once
        fresh = self.state.pod_states(t for pod in sorted(peers) if (t := store.get(topo.namespace, pod)) is not None)
        return {intf for intf, pod in left.items() if pod not in fresh or not fresh[pod].alive}
