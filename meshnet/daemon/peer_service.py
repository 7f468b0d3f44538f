"""Peer requests received from other nodes' daemons: refused unless the store backs every link of
the batch, then applied to this node's ends of the vxlan links (the gRPC servicer in `peers.py`
calls in here; errors leave as `PeerDenied`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshnet import naming
from meshnet.command import Command
from meshnet.daemon import kernel, netns, peer_auth, phases
from meshnet.daemon.link_status import LinkStatusWriter, end_status
from meshnet.daemon.peer_client import PEER_BATCH_MAX, PeerLink, wire_ip
from meshnet.daemon.state import NodeState, PodKey
from meshnet.model import LinkStatus, ManifestError, Topology
from meshnet.plan import PodState, pending_reason, plan_remote_end
from meshnet.render import render
from meshnet.store.base import StoreError


class PeerDenied(Exception):
    """A peer request the store does not back; nothing was done."""


# Seconds a peer request waits for the informer to bring a copy that backs it before one GET.
FRESH_WAIT = 0.5


class PeerService:
    def __init__(self, state: NodeState, link_status: LinkStatusWriter) -> None:
        self.state = state
        self.link_status = link_status

    def _group_backed_by_store(self, reqs: Sequence[PeerLink], *, gone_ok: bool = False
                               ) -> list[tuple[Topology, list[tuple[int, PeerLink]]]]:
        """Group a batch by local pod, each with its Topology, if the store backs every request.

        One request the store does not back refuses the whole batch (PeerDenied) before anything
        is done: a forged link never rides along with honest ones. `gone_ok` (Remove): a link the
        spec no longer has is backed too — the store shows it gone, so its end may go (only an end
        in meshnet's link group pointing at the caller's VTEP, see `remove`).
        """
        groups: dict[PodKey, list[tuple[int, PeerLink]]] = {}
        for i, req in enumerate(reqs):
            groups.setdefault((req.namespace, req.pod), []).append((i, req))
        out: list[tuple[Topology, list[tuple[int, PeerLink]]]] = []
        for (namespace, pod), items in groups.items():
            # Update: the informer's copy, once it shows the pod alive here with these links (else,
            # after a short wait for the watch, one GET). Remove: the store itself, as a copy
            # lagging behind a spec change would refuse it.
            topo = self._read(namespace, pod, None if gone_ok else self._backs(items))
            if topo is None:
                raise PeerDenied(f"no Topology {namespace}/{pod}")
            for _, req in items:
                link = topo.link(req.uid)
                if link is None and gone_ok:
                    # Nothing in the spec to compare the request's names with: they must at least
                    # be interface names before one is looked up in the kernel.
                    why = naming.ifname_problem(req.local_intf)
                    if why:
                        raise PeerDenied(f"link uid {req.uid} of {namespace}/{pod}: local_intf {why}")
                    continue
                if link is None or link.is_macvlan or link.peer_pod != req.peer_pod:
                    raise PeerDenied(f"{namespace}/{pod} has no link uid {req.uid} to {req.peer_pod}")
                want = (link.local_intf, link.peer_intf, wire_ip(link.local_ip), wire_ip(link.peer_ip), req.uid)
                # The VNI's block depends on both pods' status: `update` checks it exactly; here
                # it must at least be this link's VNI in some block.
                got = (req.local_intf, req.peer_intf, req.local_ip, req.peer_ip, req.vni % naming.VNI_BLOCK_SIZE)
                if want != got or not naming.valid_block(req.vni // naming.VNI_BLOCK_SIZE):
                    raise PeerDenied(f"link uid {req.uid} of {namespace}/{pod} differs from the request")
            out.append((topo, items))
        return out

    def _backs(self, items: Sequence[tuple[int, PeerLink]]) -> Callable[[Topology], bool]:
        """A copy of a local pod fresh enough for an update: alive here, with every link asked for."""
        def fresh(t: Topology) -> bool:
            return self.state.alive_here(t.status) and all(t.link(r.uid) is not None for _, r in items)

        return fresh

    def update(self, reqs: Sequence[PeerLink], caller: peer_auth.Caller) -> list[str]:
        """Build or update this node's ends of a batch of vxlan links (a page of a calling pod's links).
        `caller`: who sent it (peers.py), always checked (in-process callers name themselves)."""
        timing = phases.start()  # MESHNET_TIMING=1: the receiver's side of a peer call, phase by phase
        try:
            return self._update(reqs, caller, timing)
        finally:
            phases.finish(timing, self.state.log, verb="PEER-UPDATE", links=len(reqs))

    def _update(self, reqs: Sequence[PeerLink], caller: peer_auth.Caller, timing: phases.Phases) -> list[str]:
        state = self.state
        if len(reqs) > PEER_BATCH_MAX:
            raise PeerDenied(f"{len(reqs)} links in one call: at most {PEER_BATCH_MAX}")
        groups = self._group_backed_by_store(reqs)
        timing.mark("receiving pods read")
        # The callers' pods came alive before they asked: wait briefly for the watch to show it.
        read = self._reader(lambda t: t.status.alive and t.status.node != state.node.name)
        self._authorize("update", reqs, caller, read)
        timing.mark("authorize (far pods read)")
        work = []
        for topo, items in groups:
            st = topo.status
            if not state.alive_here(st):
                raise PeerDenied(f"{topo.namespace}/{topo.name} is not alive on node {state.node.name}")
            callers: dict[str, PodState] = {}
            for _, req in items:
                if req.peer_pod not in callers:
                    far = read(req.namespace, req.peer_pod)
                    if far is None or not far.status.alive or far.status.src_ip != req.peer_vtep \
                            or far.status.node == state.node.name:
                        raise PeerDenied(f"{req.namespace}/{req.peer_pod} is not alive behind VTEP {req.peer_vtep}")
                    # With its links: a far end declared down takes this end down too (plan_link).
                    callers[req.peer_pod] = PodState(far.name, True, far.status.node, far.status.src_ip,
                                                     vni_block=far.status.vni_block, links=far.links)
                block = naming.link_block(topo.namespace, st.vni_block, callers[req.peer_pod].vni_block)
                if req.vni != naming.vni(topo.namespace, req.uid, block):
                    raise PeerDenied(f"link uid {req.uid} of {topo.namespace}/{topo.name}: VNI {req.vni} is not "
                                     f"the link's ({naming.vni(topo.namespace, req.uid, block)}, VNI block {block})")
            path = state.netns_here(topo)  # never the store's net_ns
            if not path:
                raise PeerDenied(f"{topo.namespace}/{topo.name}: no sandbox of it is set up on node {state.node.name}")
            work.append((topo, items, callers, path))
        timing.mark("check")
        actions = [""] * len(reqs)
        for topo, items, callers, path in work:
            ns_name = netns.resolve(path)
            plans = [(i, plan_remote_end(topo, req.uid, ns_name, state.node, callers[req.peer_pod]))
                     for i, req in items]
            caps = state.executor.capabilities()
            timing.mark("plan")
            with state.link_locks(topo.namespace, [req.uid for _, req in items]):
                timing.mark("link locks")
                view = kernel.read_ends(state.executor, {ns_name: [p.local.intf for _, p in plans]})[ns_name]
                timing.mark("kernel view")
                applied = state.applied()
                commands: list[Command] = []
                for i, plan in plans:
                    entry = view.get(plan.local.intf)
                    if kernel.vxlan_matches(entry, plan):
                        # The same device: addresses, state and impairments change in place.
                        change = kernel.end_changes(entry or {}, plan.local, plan.uid, caps, applied)
                        commands += change
                        actions[i] = "updated" if change else "unchanged"
                    else:
                        # Remade only over an end of ours; anything else by that name makes the add
                        # fail (reported), it is never deleted (as kernel.differences).
                        remake = kernel.ours(entry)
                        commands += render([plan], "update" if remake else "add", caps)
                        actions[i] = "updated" if remake else "created"
                if commands:
                    state.executor.apply(commands)
                state.record_applied(kernel.in_force_after([p for _, p in plans], caps))
                timing.mark("apply")
            # Record the interfaces too: they are what garbage collection may later remove.
            self.link_status.write(topo, [end_status(p, p.local, caps) for _, p in plans])
            timing.mark("status write")
        return actions

    def remove(self, reqs: Sequence[PeerLink], caller: peer_auth.Caller) -> list[str]:
        """Remove this node's ends of links whose far pod (the caller's) went away, or that the spec
        no longer has."""
        if len(reqs) > PEER_BATCH_MAX:
            raise PeerDenied(f"{len(reqs)} links in one call: at most {PEER_BATCH_MAX}")
        # Checked once before the links' locks are taken: a forged batch never holds them.
        self._removable(reqs, caller)
        # Then read and checked again under the locks: an update from the far pod's next
        # incarnation (same VTEP and VNI when it is back on the same node) is then either done
        # before that read, which sees the incarnation alive and refuses, or waits until this
        # removal is over and builds the end again. Checked only before, a removal whose caller
        # gave up (its deadline passed and its DEL went on) could delete the end that
        # incarnation's update had just built: a DEL undoing a newer ADD.
        with self.state.link_locks_of((r.namespace, r.uid) for r in reqs):
            return self._remove(reqs, caller)

    def _removable(self, reqs: Sequence[PeerLink], caller: peer_auth.Caller
                   ) -> list[tuple[Topology, list[tuple[int, PeerLink]]]]:
        """The batch grouped by local pod, once the store backs it and `caller` may remove it
        (else PeerDenied); each pod read afresh."""
        groups = self._group_backed_by_store(reqs, gone_ok=True)
        self._authorize("remove", reqs, caller, self._reader(), {(t.namespace, t.name, r.uid) for t, items in groups
                                                                 for _, r in items if t.link(r.uid) is None})
        return groups

    def _remove(self, reqs: Sequence[PeerLink], caller: peer_auth.Caller) -> list[str]:
        state = self.state
        actions = ["absent"] * len(reqs)
        groups = self._removable(reqs, caller)
        for topo, items in groups:
            st = topo.status
            path = state.netns_here(topo) if state.alive_here(st) else ""  # never the store's net_ns
            if not path:
                continue
            ns_name = netns.resolve(path)
            gone: list[PeerLink] = []
            view = kernel.read_ends(state.executor, {ns_name: [r.local_intf for _, r in items]})[ns_name]
            for i, req in items:
                # Only an end of ours (link group) that points at the caller goes: a newer
                # incarnation elsewhere keeps its link, another plugin's device is never touched.
                entry = view.get(req.local_intf)
                if kernel.vxlan_towards(entry, req.peer_vtep, req.vni) and kernel.ours(entry):
                    actions[i] = "removed"
                    gone.append(req)
            if gone:
                state.executor.run_best_effort(
                    [Command(ns_name, ("link", "del", r.local_intf), r.uid) for r in gone])
            # Exactly what a plan records for a pending link, so the next reconcile writes nothing.
            # Under the locks, as an update writes its outcome: a later update's "up" is never
            # overwritten by this "pending".
            self.link_status.write(topo, [LinkStatus(r.uid, "", "pending", pending_reason(r.peer_pod)) for r in gone])
        return actions

    def read_topology(self, namespace: str, pod: str, fresh: Callable[[Topology], bool] | None = None
                      ) -> Topology | None:
        """The one read of a Topology that peer requests make: the informer's copy once `fresh` says it
        backs the request (after a short wait for the watch, else one GET); without `fresh` (Remove)
        the store itself."""
        if fresh is None:
            return self.state.store.get(namespace, pod)
        return self.state.cached(namespace, pod, fresh=fresh, wait=FRESH_WAIT)

    def _read(self, namespace: str, pod: str, fresh: Callable[[Topology], bool] | None) -> Topology | None:
        """`read_topology`; a read that fails refuses the batch."""
        try:
            return self.read_topology(namespace, pod, fresh)
        except (StoreError, ManifestError) as e:
            raise PeerDenied(f"store: {namespace}/{pod}: {e}") from e

    def _reader(self, fresh: Callable[[Topology], bool] | None = None) -> Callable[[str, str], Topology | None]:
        """The far pods of one batch, each read once (authorising and applying a batch look at the
        same far pods); the receiving pods are read once each when the batch is grouped."""
        seen: dict[tuple[str, str], Topology | None] = {}

        def read(namespace: str, pod: str) -> Topology | None:
            if (namespace, pod) not in seen:
                seen[(namespace, pod)] = self._read(namespace, pod, fresh)
            return seen[(namespace, pod)]

        return read

    def _authorize(self, kind: peer_auth.Kind, reqs: Sequence[PeerLink], caller: peer_auth.Caller,
                   read: Callable[[str, str], Topology | None],
                   gone: set[tuple[str, str, int]] | None = None) -> None:
        """Refuse the batch unless `caller` is the node hosting each far pod (peer_auth); `gone`:
        links (namespace, pod, uid) the spec no longer has."""
        if not isinstance(caller, peer_auth.Caller):  # a required argument, never skipped
            raise PeerDenied(f"{kind}: no caller")

        def far_pod(namespace: str, pod: str) -> peer_auth.FarPod | None:
            return peer_auth.far_pod_of(read(namespace, pod))

        verdict = peer_auth.authorize_batch(kind, caller, reqs, far_pod, gone or set())
        if not verdict.allowed:
            raise PeerDenied(verdict.reason)
