"""The CNI verbs (ADD, DEL, CHECK, STATUS, GC) as meshnetd serves them to the shim, and the eth0
delegate each of them runs beside meshnet's own links.

Errors leave as `CniError`; store and netns failures are turned into CNI codes here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from meshnet import naming
from meshnet.cni import delegate, protocol, results
from meshnet.cni.protocol import CniError, CniRequest
from meshnet.command import Command
from meshnet.daemon import kernel, memory, netns, phases, sandboxes, vni
from meshnet.daemon.link_status import LinkStatusWriter, veth_ends_built, veth_ends_lost
from meshnet.daemon.peer_client import PeerNotifier
from meshnet.daemon.state import NodeState, PodKey
from meshnet.ends import plan_reports
from meshnet.executor import ExecError, LinkExists
from meshnet.model import Topology, TopologyStatus
from meshnet.plan import LinkPlan, MacvlanParentRefused, VethPlan, check_macvlan_parents, plan_pod
from meshnet.render import render
from meshnet.store.base import StoreError
from meshnet.store.cache import newer


class CniVerbs:
    def __init__(self, state: NodeState, blocks: vni.VniBlocks, peers: PeerNotifier, link_status: LinkStatusWriter,
                 *, cni_path: str = protocol.DEFAULT_BIN_DIR) -> None:
        self.state = state
        self.blocks = blocks
        self.peers = peers
        self.link_status = link_status
        self.cni_path = cni_path
        self._inflight = 0  # CNI calls being served (guarded by `_lock`)
        self._lock = threading.Lock()
        # eth0 delegates run beside the link work of their ADD (own pool: they never wait on peers)
        self._delegates = ThreadPoolExecutor(max_workers=16, thread_name_prefix="delegate")

    # --- the shim's entry ------------------------------------------------------------------------

    def handle(self, command: str, env: Mapping[str, str], stdin: str) -> dict[str, Any] | None:
        if command == "VERSION":
            return protocol.version_answer(stdin)
        req = protocol.parse_request(env, stdin)
        handler = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check, "STATUS": self.status,
                   "GC": self.gc}[req.command]
        with self._lock:
            self._inflight += 1
        try:
            with self.link_status.working():  # the node is busy: peers' news is gathered meanwhile
                return handler(req)
        except StoreError as e:
            raise CniError(protocol.STORE_UNAVAILABLE, "topology store unavailable", str(e)) from e
        except netns.NetnsError as e:
            raise CniError(protocol.INVALID_ENV, "network namespace", str(e)) from e
        except MacvlanParentRefused as e:
            raise CniError(protocol.TOPOLOGY_INVALID, "macvlan parent refused", str(e)) from e
        finally:
            with self._lock:
                self._inflight -= 1
            memory.trim_soon()  # what the call freed goes back to the kernel, once its answer is out

    @property
    def busy(self) -> bool:
        """A CNI call is being served: the pods it touches are about to settle by themselves."""
        with self._lock:  # read by the reconcile thread, written by the CNI threads
            return self._inflight > 0

    def _pod(self, req: CniRequest) -> PodKey:
        name = req.pod_name
        namespace = req.pod_namespace or "default"  # podman passes no namespace
        if not name:
            return namespace, ""
        for value, what in ((name, "K8S_POD_NAME"), (namespace, "K8S_POD_NAMESPACE")):
            why = naming.k8s_name_problem(value, label=what == "K8S_POD_NAMESPACE")
            if why:
                raise CniError(protocol.INVALID_ENV, f"CNI_ARGS {what} is invalid", why)
        return namespace, name

    # --- eth0: the delegate plugin, or the result of the plugin chained before meshnet ------------

    def run_eth0_delegate(self, req: CniRequest, command: str,
                          prev: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """eth0 through the delegate (or chained, the prevResult). DEL and CHECK hand the delegate its
        part of the prevResult the runtime sent (`prev` instead: a rollback's fresh ADD result):
        the runtime keeps it across daemon restarts, an in-memory copy would not."""
        conf = req.conf
        if conf.delegate is not None:
            env = self._delegate_env(req, command)
            if prev is None and command in ("DEL", "CHECK"):
                prev = delegate.delegate_part(conf.prev_result, *self._pod(req))
            runtime = conf.raw.get("runtimeConfig")
            return delegate.run_delegate(conf.delegate, command, env, conf.cni_version, conf.name,
                                         prev_result=prev, valid_attachments=conf.valid_attachments or (),
                                         runtime_config=runtime if isinstance(runtime, dict) else None)
        if command == "ADD":
            return delegate.chained_prev_result(conf, command)
        return None

    def _delegate_env(self, req: CniRequest, command: str) -> dict[str, str]:
        args = ";".join(f"{k}={v}" for k, v in req.args.items())
        return {"CNI_COMMAND": command, "CNI_CONTAINERID": req.container_id, "CNI_NETNS": req.netns,
                "CNI_IFNAME": req.ifname or "eth0", "CNI_ARGS": args,
                "CNI_PATH": ":".join(req.path) or self.cni_path, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    # --- ADD -------------------------------------------------------------------------------------

    def add(self, req: CniRequest) -> dict[str, Any]:
        """eth0 (the delegate) and meshnet's links are independent: they are built at the same time.
        If either fails, both are undone — a failed ADD leaves nothing behind."""
        started = time.monotonic()
        timing = phases.start()  # MESHNET_TIMING=1: each phase's wall time, logged as one event
        eth0_future = self._delegates.submit(self._timed_eth0, req)
        try:
            links = self._add_links(req)
        except BaseException:
            phases.finish(timing, self.state.log, failed=True)
            self._undo_eth0(req, eth0_future)
            raise
        try:
            eth0 = eth0_future.result()
            timing.mark("wait eth0 delegate")
        except BaseException:
            phases.finish(timing, self.state.log, failed=True)
            if links is not None:
                self._undo_links(req)
            raise
        base = results.Result.from_dict(eth0) if eth0 else results.Result()
        ifaces = list(base.interfaces)
        ips = list(base.ips)
        for iface, address in links or ():
            ifaces.append(iface)
            if address is not None:
                ips.append(results.IPConfig(address, interface=len(ifaces) - 1))
        timing.mark("result")
        phases.finish(timing, self.state.log, verb="ADD", container=req.container_id[:12])
        self.state.log(event="add", container=req.container_id[:12],
                       ms=round((time.monotonic() - started) * 1000, 1))
        return replace(base, interfaces=tuple(ifaces), ips=tuple(ips)).to_dict(req.conf.cni_version)

    def _timed_eth0(self, req: CniRequest) -> dict[str, Any] | None:
        if not phases.ENABLED:
            return self.run_eth0_delegate(req, "ADD")
        t0 = time.perf_counter()
        try:
            return self.run_eth0_delegate(req, "ADD")
        finally:
            self.state.log(event="timing-eth0", ms=round((time.perf_counter() - t0) * 1000, 2))

    def _undo_eth0(self, req: CniRequest, eth0_future: Future[dict[str, Any] | None]) -> None:
        try:
            eth0 = eth0_future.result()
        except Exception:  # eth0 failed as well: nothing of it to undo
            return
        if req.conf.delegate is not None:
            try:
                self.run_eth0_delegate(req, "DEL", eth0)
            except CniError as e:
                self.state.log(event="rollback-eth0-failed", error=str(e))

    def _undo_links(self, req: CniRequest) -> None:
        namespace, pod = self._pod(req)
        topo = self.state.cached(namespace, pod)
        if topo is not None:
            self.delete_links(topo, req)

    def _release_replaced_sandbox(self, topo: Topology, req: CniRequest, ns_name: str) -> None:
        """A kubelet that finds a sandbox dead runs the pod's new sandbox first and stops and removes
        the old one afterwards. The old namespace still holds this pod's links then, and its
        vxlans keep their VNIs taken on this node ("A VXLAN device with the specified VNI already
        exists"): the newer ADD takes the pod over, so its links leave the old namespace now (the
        old sandbox's DELs are then skipped as older). Far ends stay: the new links replace them."""
        state = self.state
        sb = state.sandboxes.get(topo.key)  # the old sandbox as its ADD recorded it, never the store's
        if sb is None or sb.container_id == req.container_id:
            return
        path = state.sandboxes.netns_of(topo.key, sb.container_id)
        try:
            old = netns.resolve(path) if path else ""
        except netns.NetnsError:
            return  # gone meanwhile: nothing of the pod is left there
        if not old or old == ns_name:
            return
        state.log(event="replaced-sandbox", pod=topo.name, container=sb.container_id[:12], net_ns=old)
        with state.link_locks(topo.namespace, (lnk.uid for lnk in topo.links)):
            problems = state.executor.run_best_effort([Command(old, ("link", "del", "group", str(naming.LINK_GROUP)))])
        for p in problems:
            state.log(event="replaced-sandbox-problem", pod=topo.name, error=p)

    def _add_links(self, req: CniRequest) -> list[tuple[results.Interface, str | None]] | None:
        """Mark the pod alive and build its links; None when the pod has no Topology."""
        state = self.state
        timing = phases.current()
        namespace, pod = self._pod(req)
        timing.mark("parse request")
        if not pod:
            return None
        # Until its status write says it is alive, the links it builds must not look like ends left
        # towards a dead pod to this node's reconciler (`Reconciler._orphans`).
        with state.adding((namespace, pod)):
            return self._add_pod_links(req, namespace, pod)

    def _add_pod_links(self, req: CniRequest, namespace: str,
                       pod: str) -> list[tuple[results.Interface, str | None]] | None:
        state = self.state
        store = state.store
        timing = phases.current()
        # The informer's copy (a miss, e.g. a Topology created a moment ago, costs one GET); a stale
        # one only costs the compare-and-set of the status write a retry.
        topo = state.cached(namespace, pod)
        timing.mark("cached read")
        if topo is None:
            return None
        check_macvlan_parents(topo, state.node)  # before the pod is marked alive: nothing to undo
        ns_name = self._vouched(req.netns)
        timing.mark("netns vouch")
        self._release_replaced_sandbox(topo, req, ns_name)
        block = self.blocks.choose(topo)
        timing.mark("vni block")

        def mark_alive(cur: TopologyStatus) -> TopologyStatus:
            return replace(cur, src_ip=state.node.vtep_ip, net_ns=req.netns, container_id=req.container_id,
                           node=state.node.name, plumbing_error="", skipped=(), vni_block=block)

        # The namespace comes from this call, recorded node-locally: never read back from the store.
        # Recorded first: a DEL of an older sandbox of this pod arriving meanwhile leaves its links
        # alone (`delete`), and this pod counts as set up here in its own plan.
        state.sandboxes.put(topo.key, req.container_id, req.netns)
        timing.mark("sandbox record")
        # Planned and built from the cache BEFORE anything is written: the pod is marked alive in
        # the same write that records its links' outcome (one status write per ADD). Its peers'
        # daemons do not hear of it before that write, so they ask nothing of this node early.
        failure: ExecError | None = None
        # The peers' copies as the store has them now: a peer DELeted on another node a moment ago
        # must not be planned for as alive (a link would be built towards a pod that is gone).
        state.caught_up()
        timing.mark("cache caught up")
        for pause in (*vni.VNI_CLASH_PAUSES, None):
            planned = topo.with_status(mark_alive(topo.status))
            listed = state.peers_of(planned)  # its peers' cached copies: no LIST
            timing.mark("peers' copies")
            plan = plan_pod(planned, ns_name, state.node, state.pod_states(listed))
            timing.mark("plan")
            try:
                self.build(namespace, plan.links)
                failure = None
                break
            except ExecError as e:
                failure = e
                if pause is None or not kernel.vni_clash(e):
                    break
                # Another namespace's pod came up with the same VNI block at the same moment. Each
                # daemon sees the other's record within milliseconds and one side moves
                # (naming.block_lost): this pod now, or the other one, whose link we then wait for.
                state.log(event="vni-clash", pod=pod, block=block, error=str(e))
                # Our block is not in the store yet (the ADD's one write comes after the build):
                # recorded now, not alive, so the other namespace's daemon sees both records.
                topo = state.remember(store.update_status(namespace, pod, lambda cur: replace(
                    mark_alive(cur.status), src_ip="", net_ns=""), known=topo)) or topo
                time.sleep(pause)
                topo = state.cached(namespace, pod) or topo
                if self.blocks.lost(planned):
                    block = self.blocks.choose(planned)
        if failure is not None:
            message = f"{pod}: {failure}"
            # Not alive (no VTEP, no namespace), but this sandbox's: its DEL is not taken for an old one's.
            store.update_status(namespace, pod, lambda cur: replace(
                mark_alive(cur.status), src_ip="", net_ns="", plumbing_error=message), known=topo)
            raise CniError(protocol.LINK_PLUMBING_FAILED, "link plumbing failed", message) from failure
        # Alive and the outcome in one write; the far ends on other nodes are asked for after it
        # (their daemons check the store says this pod is alive there), so a vxlan link reads
        # "up" for its own end until a failed peer call says otherwise (rare: written again).
        written = self.link_status.write_outcome(topo, req.container_id, plan, {}, take_over=mark_alive)
        timing.mark("status write (alive and outcome)")
        # None: the Topology went away meanwhile; the reconciler removes what was built for it.
        topo = written or planned
        # Two pods coming up at once plan before either is written; the later write must build the
        # link. Once the cache holds everything written before ours, a peer that our plan took for
        # not alive but that is now came alive meanwhile.
        state.catch_up(topo)
        timing.mark("cache catch-up")
        again = state.peers_of(topo)
        copies = {t.name: t for t in again}
        states = state.pod_states(again)
        # Planned again only if a pending link's peer can be linked now (what `plan_link` needs of
        # it): the later of two ADDs finds its peers alive already and plans once (1500 veths: a
        # second plan was ~20 ms of its CPU for nothing).
        if topo.status.vni_block == planned.status.vni_block and not any(
                (ps := states.get(p.peer_pod)) is not None and ps.alive and not ps.problems
                for p in plan.pending):
            later = plan
        else:
            later = plan_pod(topo, ns_name, state.node, states)
        rewrite = False
        came = {p.uid for p in plan.pending} - {p.uid for p in later.pending}
        if written is not None:
            # The later of two writes builds the link. A peer whose copy is newer than our write
            # caught up with ours after writing its own, so its ADD sees this pod alive and builds
            # the link itself: building it here too only queued this ADD behind that one's link
            # locks to find everything done (links1: +0.4 s). Should the peer's newer copy be some
            # other write after an alive one that had not seen ours, this node's reconciler still
            # builds the link: our write is a watch event that concerns the peer.
            came -= {lnk.uid for lnk in topo.links
                     if (peer := copies.get(lnk.peer_pod)) is not None and newer(peer, topo)}
        if came and {p.uid for p in later.pending} <= {p.uid for p in plan.pending}:
            try:
                self.build(namespace, [lp for lp in later.links if lp.uid in came])
            except ExecError as e:  # left to the reconciler: its pass sees the link pending towards a live peer
                state.log(event="late-peer-build-failed", pod=pod, error=str(e))
            else:
                plan, listed, rewrite = later, again, True
            timing.mark("late peers")
        remote_errors = self.peers.build_far_ends(topo, plan)
        timing.mark("peer call")
        self.peers.note_owed(topo.key, plan, remote_errors)
        if remote_errors or rewrite:
            self.link_status.write_outcome(topo, req.container_id, plan, remote_errors)
            timing.mark("status write (outcome again)")
        caps = state.executor.capabilities()
        self.link_status.tell_veth_peers(listed, veth_ends_built(topo, plan, listed, caps))
        timing.mark("veth peers' status")
        for lp in plan.links:
            for report in plan_reports(lp, caps):
                if report.message:  # the link is up; what this node cannot apply is said once, here
                    state.log(event="impairments-unavailable", pod=f"{namespace}/{pod}", uid=report.uid,
                              message=report.message)
        out: list[tuple[results.Interface, str | None]] = []
        for lp in plan.links:
            end = lp.a if isinstance(lp, VethPlan) else lp.local
            # Runtimes that read the result need each sandbox interface's MAC (podman rejects a
            # result without one): meshnet sets them itself, stable per pod and interface.
            out.append((results.Interface(end.intf, mac=end.mac, sandbox=req.netns),
                        str(end.ip) if end.ip is not None else None))
        return out

    @staticmethod
    def _vouched(path: str) -> str:
        """The iproute2 name of the runtime's namespace, once it is shown to be a network namespace
        and neither the daemon's own nor the host's."""
        why = sandboxes.netns_problem(path) if path else None
        if why:
            raise netns.NetnsError(f"CNI_NETNS: {why}")
        return netns.resolve(path)

    def build(self, namespace: str, plans: Sequence[LinkPlan]) -> None:
        """Create links; what already exists and matches is left, what differs is made again."""
        if not plans:
            return
        state = self.state
        executor = state.executor
        # What this kernel can do: without netem a delay is reported unavailable, not a failed ADD.
        caps = executor.capabilities()
        timing = phases.current()
        timing.mark("capabilities")
        with state.link_locks(namespace, (p.uid for p in plans)):
            timing.mark("link locks")
            try:
                batch = render(plans, "add", caps)
                timing.mark("render")
                executor.apply(batch)
                timing.mark("ip (executor)")
            except LinkExists:
                # A concurrent ADD, a restarted daemon or a re-ADD got there first: look. Logged as
                # handled, so the batch's "File exists" above it does not read as a failure.
                state.log(event="link-exists-race-handled", level="info", namespace=namespace,
                          uids=[p.uid for p in plans][:20])
                wanted: dict[str, list[str]] = {}
                for e in (e for p in plans for e in p.ends):
                    wanted.setdefault(e.netns, []).append(e.intf)
                view = kernel.read_ends(executor, wanted)
                todo = kernel.differences(plans, view, caps, state.applied())
                if todo:
                    executor.apply(todo)
            state.record_applied(kernel.in_force_after(plans, caps))

    # --- DEL and GC ------------------------------------------------------------------------------

    def delete(self, req: CniRequest) -> None:
        namespace, pod = self._pod(req)
        # The cached copy: if it is stale, delete_links's compare-and-set re-checks who owns the pod.
        topo = self.state.cached(namespace, pod) if pod else None
        if topo is not None:
            owner = topo.status.container_id
            sb = self.state.sandboxes.get(topo.key)
            if sb is not None and sb.container_id != req.container_id:
                # This node's ADD of a newer sandbox recorded it before writing the status: the
                # links are the new one's even if the store does not say so yet.
                self.state.log(event="del-skipped", pod=pod, container=req.container_id[:12],
                               owner=sb.container_id[:12])
            elif owner and owner != req.container_id:
                # A DEL for an old sandbox arriving after a newer ADD: the links are the new one's.
                self.state.log(event="del-skipped", pod=pod, container=req.container_id[:12], owner=owner[:12])
            else:
                self.delete_links(topo, req)
        self.run_eth0_delegate(req, "DEL")
        return None

    def delete_links(self, topo: Topology, req: CniRequest) -> None:
        """Forget the pod first, then remove its links: once the store says it is not alive, no
        reconcile pass (ours or a peer's) builds towards it while the links go."""
        state = self.state
        owned = False

        def clear(cur: Topology) -> TopologyStatus | None:
            nonlocal owned
            owned = cur.status.container_id in ("", req.container_id)
            if not owned:
                return None  # a newer sandbox owns the pod now: its links stay
            return None if cur.status == TopologyStatus() else TopologyStatus()

        state.store.update_status(topo.namespace, topo.name, clear, known=topo)
        if not owned:
            state.log(event="del-skipped", pod=topo.name, container=req.container_id[:12])
            return
        # The runtime's path, else the one this daemon recorded at ADD; touched only once vouched for.
        sb = state.sandboxes.drop(topo.key, req.container_id)
        path = req.netns or (sb.netns if sb is not None else "")
        why = sandboxes.netns_problem(path) if path else "no namespace"
        if why and sb is not None:
            state.sandboxes.release(sb)  # the sandbox vanished: our bind mount of it goes too
        ns_name = netns.resolve(path) if not why else ""
        if ns_name:
            # Every interface meshnet made is in its link group: one batched kernel call removes
            # them all (a veth's far end goes with it); other plugins' interfaces stay.
            with state.link_locks(topo.namespace, (lnk.uid for lnk in topo.links)):
                problems = state.executor.run_best_effort(
                    [Command(ns_name, ("link", "del", "group", str(naming.LINK_GROUP)))])
            for p in problems:
                state.log(event="del-problem", pod=topo.name, error=p)
        remote = [lnk for lnk in topo.links if not lnk.is_macvlan]
        listed = [t for t in state.peers_of(topo) if t.name in {lnk.peer_pod for lnk in remote}]
        peers = state.pod_states(listed)
        self.link_status.tell_veth_peers(listed, veth_ends_lost(state, topo, remote, listed))
        self.peers.remove_far_ends(topo, remote, peers)
        if ns_name:
            state.forget_applied(ns_name)
            netns.detach(ns_name)

    def gc(self, req: CniRequest) -> None:
        """Forget pods of this node whose sandbox the runtime no longer lists; remove their links."""
        valid = {a.container_id for a in req.conf.valid_attachments or ()}
        for topo in self.state.all_topologies():
            st = topo.status
            if st.node != self.state.node.name or not st.container_id or st.container_id in valid:
                continue
            self.state.log(event="gc", pod=topo.name, container=st.container_id[:12])
            sb = self.state.sandboxes.get(topo.key)  # the namespace as its ADD recorded it, never the store's
            path = sb.netns if sb is not None and sb.container_id == st.container_id else ""
            stale = req.replace(container_id=st.container_id, netns=path if netns.exists(path) else "")
            self.delete_links(topo, stale)
        if req.conf.delegate is not None:
            self.run_eth0_delegate(req, "GC")
        return None

    # --- CHECK and STATUS ------------------------------------------------------------------------

    def check(self, req: CniRequest) -> None:
        if req.conf.delegate is not None:
            self.run_eth0_delegate(req, "CHECK")
        namespace, pod = self._pod(req)
        topo = self.state.cached(namespace, pod) if pod else None
        if topo is None:
            return None
        if topo.status.container_id != req.container_id:
            raise CniError(protocol.CONTAINER_UNKNOWN, f"{pod} is not set up by this container",
                           f"status has container {topo.status.container_id or 'none'}")
        ns_name = self._vouched(req.netns)
        plan = plan_pod(topo, ns_name, self.state.node, self.state.pod_states(self.state.peers_of(topo)))
        view = kernel.read_view(self.state.executor, [ns_name])[ns_name]  # links with their addresses, one ip call
        problems = kernel.check_problems(plan.links, view)
        if problems:
            raise CniError(protocol.LINK_PLUMBING_FAILED, f"{pod}: links differ from the topology", "; ".join(problems))
        return None

    def status(self, req: CniRequest) -> None:
        try:
            if not self.state.cache.healthy:  # the informer's watch is not following the store: ask it
                self.state.store.list("default")
        except StoreError as e:
            raise CniError(protocol.PLUGIN_NOT_AVAILABLE, "meshnet cannot reach its topology store", str(e)) from e
        if req.conf.delegate is not None:
            self.run_eth0_delegate(req, "STATUS")
        return None

    def close(self) -> None:
        self._delegates.shutdown(wait=False, cancel_futures=True)
