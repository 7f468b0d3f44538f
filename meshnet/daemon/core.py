"""What meshnetd does: CNI ADD / DEL / CHECK / STATUS / GC and the peer calls, over a store.

No gRPC or HTTP here: the servers in `api.py` and `peers.py` call into `Meshnet`, and the peer
client is handed in (a fake in unit tests, gRPC in the daemon). Errors leave as `CniError` (for the
shim) or `PeerDenied` (for the gRPC edge).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Protocol

from meshnet import naming
from meshnet.cni import delegate, results
from meshnet.cni import protocol as spec
from meshnet.cni.protocol import CniError, CniRequest
from meshnet.command import Command
from meshnet.daemon import netns
from meshnet.executor import ExecError, Executor, LinkExists
from meshnet.model import Link, LinkStatus, ManifestError, Skip, Topology, TopologyStatus
from meshnet.plan import (
    Endpoint,
    LinkPlan,
    NodeInfo,
    PeerState,
    PodPlan,
    RemoteEnd,
    VethPlan,
    VxlanPlan,
    plan_pod,
    plan_remote_end,
)
from meshnet.render import render
from meshnet.store.base import Store, StoreError

Log = Callable[..., None]


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


class PeerDenied(Exception):
    """A peer request the store does not back; nothing was done."""


class PeerError(Exception):
    """A peer daemon could not be reached or failed."""


class PeerClient(Protocol):
    """The gRPC edge (a fake in unit tests): one call per peer node carries all its links."""

    def update_many(self, address: str, links: Sequence[PeerLink]) -> list[str]: ...

    def remove_many(self, address: str, links: Sequence[PeerLink]) -> list[str]: ...


# How long an ADD waits, in steps, for a VNI-block clash with another namespace to be settled.
VNI_CLASH_PAUSES = (0.1, 0.2, 0.4, 0.8, 1.0)
MAX_CLASH_RETRIES = 10
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


def _vni_clash(e: ExecError) -> bool:
    """The kernel refused a vxlan because its VNI is in use on this node (another namespace's)."""
    text = f"{e} {e.stderr}"
    return "VNI already exists" in text or ("File exists" in text and "vxlan" in text)


def _forget_vanished(container_id: str) -> Callable[[Topology], TopologyStatus | None]:
    """A status mutation: the pod's netns is gone (crash, reboot), so it is not alive any more."""

    def fn(cur: Topology) -> TopologyStatus | None:
        if cur.status.container_id != container_id:
            return None
        return TopologyStatus(plumbing_error=f"network namespace {cur.status.net_ns} vanished")

    return fn


def _ip(value: object) -> str:
    return "" if value is None else str(value)


def kernel_view(executor: Executor, names: Iterable[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{netns: {ifname: `ip -j -d link show` entry}} for each namespace (missing ones are empty)."""
    view: dict[str, dict[str, dict[str, Any]]] = {}
    for ns in set(names):
        try:
            view[ns] = {e["ifname"]: e for e in executor.show(ns)}
        except ExecError:
            view[ns] = {}
    return view


def _kind(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return ""
    return str(entry.get("linkinfo", {}).get("info_kind", ""))


def _configured(entry: Mapping[str, Any] | None, end: Endpoint) -> bool:
    """The interface is up and carries exactly the link's address (besides link-local IPv6)."""
    if not entry or "UP" not in entry.get("flags", ()):
        return False
    have = {f"{a.get('local')}/{a.get('prefixlen')}" for a in entry.get("addr_info", ())
            if a.get("scope") != "link"}
    return have == ({str(end.ip)} if end.ip is not None else set())


def vxlan_matches(entry: Mapping[str, Any] | None, plan: VxlanPlan) -> bool:
    if _kind(entry) != "vxlan":
        return False
    assert entry is not None
    data = entry.get("linkinfo", {}).get("info_data", {})
    return (data.get("id") == plan.vni and data.get("remote") == plan.remote_ip
            and data.get("local") == plan.vtep_ip and data.get("port") == plan.port)


class Meshnet:
    def __init__(self, node: NodeInfo, store: Store, executor: Executor, peers: PeerClient, *,
                 grpc_port: int, cni_path: str = "/opt/cni/bin", log: Log | None = None) -> None:
        self.node = node
        self.store = store
        self.executor = executor
        self.peers = peers
        self.grpc_port = grpc_port
        self.cni_path = cni_path
        self._log: Log = log or (lambda **_: None)
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._eth0_cache: dict[str, dict[str, Any]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="peer")
        # eth0 delegates run beside the link work of their ADD (own pool: they never wait on peers)
        self._delegates = ThreadPoolExecutor(max_workers=16, thread_name_prefix="delegate")
        self._seen: dict[tuple[str, str], Topology] = {}
        self._maybe_settled: set[tuple[str, str]] = set()
        # Pods whose pass hit a VNI clash, with how often in a row: the other namespace's pod is
        # moving to another block, so they are worth another pass soon (Reconciler.take_retries).
        self._clashes: dict[tuple[str, str], int] = {}
        self._peers_backoff = PeerBackoff()
        # Pods with vxlan links whose far end a peer update failed to build: {pod: peer addresses}.
        self._far_owed: dict[tuple[str, str], set[str]] = {}
        self._inflight = 0
        self._inflight_lock = threading.Lock()

    # --- helpers -----------------------------------------------------------------------------

    def _link_locks(self, namespace: str, uids: Iterable[int]) -> ExitStack:
        """Serialise work per link (sorted, so two ADDs never wait on each other in a cycle)."""
        stack = ExitStack()
        with self._locks_guard:
            locks = [self._locks.setdefault((namespace, uid), threading.Lock()) for uid in sorted(set(uids))]
        for lock in locks:
            stack.enter_context(lock)
        return stack

    def _pod(self, req: CniRequest) -> tuple[str, str]:
        name = req.pod_name
        namespace = req.pod_namespace or "default"  # podman passes no namespace
        if not name:
            return namespace, ""
        for value, what in ((name, "K8S_POD_NAME"), (namespace, "K8S_POD_NAMESPACE")):
            why = naming.k8s_name_problem(value, label=what == "K8S_POD_NAMESPACE")
            if why:
                raise CniError(spec.INVALID_ENV, f"CNI_ARGS {what} is invalid", why)
        return namespace, name

    def _eth0(self, req: CniRequest, command: str) -> dict[str, Any] | None:
        conf = req.conf
        if conf.delegate is not None:
            env = self._delegate_env(req, command)
            prev = self._eth0_cache.get(req.container_id) if command in ("DEL", "CHECK") else None
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

    def _peer_states(self, topologies: Iterable[Topology]) -> dict[str, PeerState]:
        states: dict[str, PeerState] = {}
        for t in topologies:
            st = t.status
            ns_name = ""
            if st.alive and st.node == self.node.name and netns.exists(st.net_ns):
                try:
                    ns_name = netns.resolve(st.net_ns)
                except netns.NetnsError:
                    ns_name = ""
            # A pod on this node whose namespace vanished is not alive, whatever the store says.
            alive = st.alive and (st.node != self.node.name or bool(ns_name))
            states[t.name] = PeerState(t.name, alive, st.node, st.src_ip, ns_name, st.vni_block)
        return states

    # --- CNI -----------------------------------------------------------------------------------

    def handle(self, command: str, env: Mapping[str, str], stdin: str) -> dict[str, Any] | None:
        if command == "VERSION":
            return spec.version_answer(stdin)
        req = spec.parse_request(env, stdin)
        handler = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check, "STATUS": self.status,
                   "GC": self.gc}[req.command]
        with self._inflight_lock:
            self._inflight += 1
        try:
            return handler(req)
        except StoreError as e:
            raise CniError(spec.STORE_UNAVAILABLE, "topology store unavailable", str(e)) from e
        except netns.NetnsError as e:
            raise CniError(spec.INVALID_ENV, "network namespace", str(e)) from e
        finally:
            with self._inflight_lock:
                self._inflight -= 1

    @property
    def busy(self) -> bool:
        """A CNI call is being served: the pods it touches are about to settle by themselves."""
        return self._inflight > 0

    def add(self, req: CniRequest) -> dict[str, Any]:
        """eth0 (the delegate) and meshnet's links are independent: they are built at the same time.
        If either fails, both are undone — a failed ADD leaves nothing behind."""
        started = time.monotonic()
        eth0_future = self._delegates.submit(self._eth0, req, "ADD")
        try:
            links = self._add_links(req)
        except BaseException:
            self._undo_eth0(req, eth0_future)
            raise
        try:
            eth0 = eth0_future.result()
        except BaseException:
            if links is not None:
                self._undo_links(req)
            raise
        if eth0 is not None:
            self._eth0_cache[req.container_id] = eth0
        base = results.Result.from_dict(eth0) if eth0 else results.Result()
        ifaces = list(base.interfaces)
        ips = list(base.ips)
        for iface, address in links or ():
            ifaces.append(iface)
            if address is not None:
                ips.append(results.IPConfig(address, interface=len(ifaces) - 1))
        self._log(event="add", container=req.container_id[:12], ms=round((time.monotonic() - started) * 1000, 1))
        return replace(base, interfaces=tuple(ifaces), ips=tuple(ips)).to_dict(req.conf.cni_version)

    def _undo_eth0(self, req: CniRequest, eth0_future: Future[dict[str, Any] | None]) -> None:
        try:
            eth0_future.result()
        except Exception:  # eth0 failed as well: nothing of it to undo
            return
        if req.conf.delegate is not None:
            try:
                self._eth0(req, "DEL")
            except CniError as e:
                self._log(event="rollback-eth0-failed", error=str(e))

    def _undo_links(self, req: CniRequest) -> None:
        namespace, pod = self._pod(req)
        topo = self.store.get(namespace, pod)
        if topo is not None:
            self._delete_links(topo, req)

    def _add_links(self, req: CniRequest) -> list[tuple[results.Interface, str | None]] | None:
        """Mark the pod alive and build its links; None when the pod has no Topology."""
        namespace, pod = self._pod(req)
        topo = self.store.get(namespace, pod) if pod else None
        if topo is None:
            return None
        ns_name = netns.resolve(req.netns)
        block = self._vni_block(topo)

        def mark_alive(cur: Topology) -> TopologyStatus:
            return replace(cur.status, src_ip=self.node.vtep_ip, net_ns=req.netns, container_id=req.container_id,
                           node=self.node.name, plumbing_error="", skipped=(), vni_block=block)

        # `topo` was read just now: it stands in for the store's read before the write.
        topo = self.store.update_status(namespace, pod, mark_alive, known=topo) or topo
        failure: ExecError | None = None
        for pause in (*VNI_CLASH_PAUSES, None):
            listed = self.store.list(namespace)
            plan = plan_pod(topo, ns_name, self.node, self._peer_states(listed))
            try:
                self.build(namespace, plan.links)
                failure = None
                break
            except ExecError as e:
                failure = e
                if pause is None or not _vni_clash(e):
                    break
                # Another namespace's pod came up with the same VNI block at the same moment. Each
                # daemon sees the other's record within milliseconds and one side moves
                # (naming.block_lost): this pod now, or the other one, whose link we then wait for.
                self._log(event="vni-clash", pod=pod, block=topo.status.vni_block, error=str(e))
                time.sleep(pause)
                topo = self.store.get(namespace, pod) or topo
                if self._block_lost(topo):
                    topo = self._move_block(topo)
        if failure is not None:
            message = f"{pod}: {failure}"
            self.store.update_status(namespace, pod, lambda cur: replace(
                cur.status, src_ip="", net_ns="", plumbing_error=message)
                if cur.status.container_id == req.container_id else None)
            raise CniError(spec.LINK_PLUMBING_FAILED, "link plumbing failed", message) from failure
        remote_errors = self.notify_peers(topo, plan)
        self._owe_far_ends(topo.key, plan, remote_errors)
        self._record(topo, req.container_id, plan, remote_errors)
        self._veth_peers_up(topo, plan, listed)
        out: list[tuple[results.Interface, str | None]] = []
        for lp in plan.links:
            end = lp.a if isinstance(lp, VethPlan) else lp.local
            # Runtimes that read the result need each sandbox interface's MAC (podman rejects a
            # result without one): meshnet sets them itself, stable per pod and interface.
            out.append((results.Interface(end.intf, mac=end.mac, sandbox=req.netns),
                        str(end.ip) if end.ip is not None else None))
        return out

    def _record(self, topo: Topology, container_id: str, plan: PodPlan, errors: Mapping[int, str]) -> None:
        """Per-link state in the pod's status (only when it changed: every write wakes every watcher)."""
        intf = {lnk.uid: lnk.local_intf for lnk in topo.links}
        states = [LinkStatus(lp.uid, lp.kind, "error" if lp.uid in errors else "up", errors.get(lp.uid, ""),
                             intf.get(lp.uid, "")) for lp in plan.links]
        states += [LinkStatus(p.uid, "", "pending", p.reason, "") for p in plan.pending]
        states.sort(key=lambda s: s.uid)
        skipped = tuple(Skip(p.peer_pod, p.uid) for p in plan.pending)
        error = "; ".join(f"uid {u}: {m}" for u, m in sorted(errors.items()))

        def write(cur: Topology) -> TopologyStatus | None:
            if cur.status.container_id != container_id:
                return None  # a newer sandbox owns the status now
            new = replace(cur.status, links=tuple(states), skipped=skipped, plumbing_error=error)
            return None if new == cur.status else new

        self.store.update_status(topo.namespace, topo.name, write, known=topo)

    def build(self, namespace: str, plans: Sequence[LinkPlan]) -> None:
        """Create links; what already exists and matches is left, what differs is made again."""
        if not plans:
            return
        with self._link_locks(namespace, (p.uid for p in plans)):
            try:
                self.executor.apply(render(plans, "add"))
                return
            except LinkExists:
                pass  # a concurrent ADD, a restarted daemon or a re-ADD got there first: look
            todo = self._differences(plans)
            if todo:
                self.executor.apply(todo)

    def _differences(self, plans: Sequence[LinkPlan],
                     view: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None) -> list[Command]:
        """Commands that turn the kernel into the plans: missing links made, wrong ones made again,
        links with other addresses (or down) configured again; links that match are left alone."""
        if view is None:
            view = kernel_view(self.executor, [e.netns for p in plans for e in p.ends])
        commands: list[Command] = []
        for p in plans:
            entries = [view.get(e.netns, {}).get(e.intf) for e in p.ends]
            if isinstance(p, VethPlan):
                if all(_kind(e) == "veth" for e in entries):
                    if not all(_configured(e, end) for e, end in zip(entries, p.ends, strict=True)):
                        commands += render([p], "update")
                    continue
                # Missing, or an end whose far side is elsewhere (a stale pair): make the pair again.
                commands += [Command(end.netns, ("link", "del", end.intf), p.uid)
                             for e, end in zip(entries, p.ends, strict=True) if e is not None]
                commands += render([p], "add")
                continue
            entry = entries[0]
            if isinstance(p, VxlanPlan):
                if not vxlan_matches(entry, p):
                    commands += render([p], "update" if entry else "add")
                    continue
            elif _kind(entry) != "macvlan":
                if entry is not None:
                    commands.append(Command(p.local.netns, ("link", "del", p.local.intf), p.uid))
                commands += render([p], "add")
                continue
            if not _configured(entry, p.ends[0]):
                commands += render([p], "update")
        return commands

    def _vni_block(self, topo: Topology) -> int:
        """The VNI block `topo`'s pod records as it comes alive: its namespace's, as the other pods
        of the namespace recorded it, or a block no other namespace uses (naming.choose_vni_block).
        Read from the watch's copies of every Topology: no API call on the ADD path."""
        seen = [t for t in list(self._seen.values()) if t.key != topo.key] + [topo]
        own = [t.status.vni_block for t in seen if t.namespace == topo.namespace]
        return naming.choose_vni_block(topo.namespace, own, self._other_blocks(topo.namespace, seen))

    @staticmethod
    def _other_blocks(namespace: str, topologies: Iterable[Topology]) -> list[tuple[str, int]]:
        return [(t.namespace, t.status.vni_block) for t in topologies
                if t.namespace != namespace and t.status.vni_block]

    def _block_lost(self, topo: Topology) -> bool:
        """The pod's recorded block is also another namespace's, which keeps it (naming.block_lost)."""
        block = topo.status.vni_block
        return bool(block) and naming.block_lost(
            topo.namespace, block, self._other_blocks(topo.namespace, list(self._seen.values())))

    def _peer_link(self, topo: Topology, uid: int, vni: int) -> PeerLink:
        link = topo.link(uid)
        assert link is not None
        return PeerLink(topo.namespace, link.peer_pod, topo.name, uid, vni,
                        link.peer_intf, link.local_intf, _ip(link.peer_ip), _ip(link.local_ip), self.node.vtep_ip)

    def notify_peers(self, topo: Topology, plan: PodPlan) -> dict[int, str]:
        """Ask each remote peer's daemon to build its vxlan ends — one call per node, all its links
        in it; returns {uid: error} for failures."""
        if not plan.remote:
            return {}
        by_node: dict[str, list[int]] = {}
        for r in plan.remote:
            by_node.setdefault(f"{r.peer_src_ip}:{self.grpc_port}", []).append(r.uid)
        vnis = {p.uid: p.vni for p in plan.links if isinstance(p, VxlanPlan)}
        futures = {address: self._pool.submit(self.peers.update_many, address,
                                              [self._peer_link(topo, uid, vnis[uid]) for uid in uids])
                   for address, uids in by_node.items()}
        errors: dict[int, str] = {}
        for address, fut in futures.items():
            try:
                actions = fut.result()
                self._peers_backoff.succeeded(address)
                self._log(event="peer-update", peer=address, links=len(actions),
                          created=actions.count("created"), updated=actions.count("updated"))
            except Exception as e:  # any failure of one peer must not hide the others
                self._peers_backoff.failed(address)
                errors.update({uid: f"peer update failed: {e}" for uid in by_node[address]})
                self._log(event="peer-update-failed", peer=address, error=str(e))
        return errors

    def _retry_far_ends(self, topo: Topology, plan: PodPlan, skip: Iterable[int]) -> dict[int, str]:
        """Ask the peers again for the far ends of vxlan links the status shows in `error` (a peer
        update failed): our end being in the kernel says nothing about theirs, so such a link is
        only called up once its peer's daemon has built its end. A peer daemon that failed is left
        alone for a while (PeerBackoff): one pass must not wait on it for every pod."""
        skipped = set(skip)
        failed = {s.uid: s.message for s in topo.status.links if s.state == "error" and s.uid not in skipped}
        owed = [r for r in plan.remote if r.uid in failed]
        remote = tuple(r for r in owed if self._peers_backoff.due(self._peer_address(r)))
        errors = {r.uid: failed[r.uid] or "peer update failed" for r in owed if r not in remote}
        if remote:
            errors.update(self.notify_peers(topo, replace(plan, remote=remote)))
        self._owe_far_ends(topo.key, plan, errors)
        return errors

    def _peer_address(self, r: RemoteEnd) -> str:
        return f"{r.peer_src_ip}:{self.grpc_port}"

    def _owe_far_ends(self, key: tuple[str, str], plan: PodPlan, errors: Mapping[int, str]) -> None:
        """Remember (for take_retries) which peers still owe this pod far ends, or forget the pod."""
        owed = {self._peer_address(r) for r in plan.remote if r.uid in errors}
        if owed:
            self._far_owed[key] = owed
        else:
            self._far_owed.pop(key, None)

    def delete(self, req: CniRequest) -> None:
        namespace, pod = self._pod(req)
        topo = self.store.get(namespace, pod) if pod else None
        if topo is not None:
            owner = topo.status.container_id
            if owner and owner != req.container_id:
                # A DEL for an old sandbox arriving after a newer ADD: the links are the new one's.
                self._log(event="del-skipped", pod=pod, container=req.container_id[:12], owner=owner[:12])
            else:
                self._delete_links(topo, req)
        self._eth0(req, "DEL")
        self._eth0_cache.pop(req.container_id, None)
        return None

    def _delete_links(self, topo: Topology, req: CniRequest) -> None:
        """Forget the pod first, then remove its links: once the store says it is not alive, no
        reconcile pass (ours or a peer's) builds towards it while the links go."""
        owned = False

        def clear(cur: Topology) -> TopologyStatus | None:
            nonlocal owned
            owned = cur.status.container_id in ("", req.container_id)
            if not owned:
                return None  # a newer sandbox owns the pod now: its links stay
            return None if cur.status == TopologyStatus() else TopologyStatus()

        self.store.update_status(topo.namespace, topo.name, clear, known=topo)
        if not owned:
            self._log(event="del-skipped", pod=topo.name, container=req.container_id[:12])
            return
        path = req.netns or topo.status.net_ns
        ns_name = netns.resolve(path) if netns.exists(path) else ""
        if ns_name:
            # Every interface meshnet made is in its link group: one batched kernel call removes
            # them all (a veth's far end goes with it); other plugins' interfaces stay.
            with self._link_locks(topo.namespace, (lnk.uid for lnk in topo.links)):
                problems = self.executor.remove([Command(ns_name, ("link", "del", "group", str(naming.LINK_GROUP)))])
            for p in problems:
                self._log(event="del-problem", pod=topo.name, error=p)
        remote = [lnk for lnk in topo.links if not lnk.is_macvlan]
        listed = [t for t in self.store.list(topo.namespace) if t.name in {lnk.peer_pod for lnk in remote}]
        peers = self._peer_states(listed)
        self._veth_peers_pending(topo, remote, listed)
        far: dict[str, list[PeerLink]] = {}
        for lnk in remote:
            st = peers.get(lnk.peer_pod)
            if st is not None and st.alive and st.node != self.node.name and st.src_ip:
                # `topo` is the status as it was before the DEL cleared it: the block the link used.
                block = naming.link_block(topo.namespace, topo.status.vni_block, st.vni_block)
                vni = naming.vni(topo.namespace, lnk.uid, block)
                far.setdefault(f"{st.src_ip}:{self.grpc_port}", []).append(self._peer_link(topo, lnk.uid, vni))
        futures = [self._pool.submit(self.peers.remove_many, address, links) for address, links in far.items()]
        for fut in futures:
            try:
                fut.result()
            except Exception as e:  # the far end is garbage-collected later; DEL must succeed
                self._log(event="peer-remove-failed", error=str(e))
        if ns_name:
            netns.detach(ns_name)

    def check(self, req: CniRequest) -> None:
        if req.conf.delegate is not None:
            self._eth0(req, "CHECK")
        namespace, pod = self._pod(req)
        topo = self.store.get(namespace, pod) if pod else None
        if topo is None:
            return None
        if topo.status.container_id != req.container_id:
            raise CniError(spec.CONTAINER_UNKNOWN, f"{pod} is not set up by this container",
                           f"status has container {topo.status.container_id or 'none'}")
        ns_name = netns.resolve(req.netns)
        plan = plan_pod(topo, ns_name, self.node, self._peer_states(self.store.list(namespace)))
        view = kernel_view(self.executor, [ns_name])[ns_name]  # links with their addresses, one ip call
        addrs = {name: {f"{a['local']}/{a['prefixlen']}" for a in e.get("addr_info", ())} for name, e in view.items()}
        problems = []
        for lp in plan.links:
            end = lp.a if isinstance(lp, VethPlan) else lp.local
            entry = view.get(end.intf)
            if entry is None:
                problems.append(f"link uid {lp.uid}: {end.intf} is missing")
            elif _kind(entry) != lp.kind:
                problems.append(f"link uid {lp.uid}: {end.intf} is a {_kind(entry) or 'device'} not a {lp.kind}")
            elif isinstance(lp, VxlanPlan) and not vxlan_matches(entry, lp):
                problems.append(f"link uid {lp.uid}: {end.intf} has the wrong VNI or remote")
            elif end.ip is not None and str(end.ip) not in addrs.get(end.intf, set()):
                problems.append(f"link uid {lp.uid}: {end.intf} lacks {end.ip}")
        if problems:
            raise CniError(spec.LINK_PLUMBING_FAILED, f"{pod}: links differ from the topology", "; ".join(problems))
        return None

    def status(self, req: CniRequest) -> None:
        try:
            self.store.list("default")
        except StoreError as e:
            raise CniError(spec.PLUGIN_NOT_AVAILABLE, "meshnet cannot reach its topology store", str(e)) from e
        if req.conf.delegate is not None:
            self._eth0(req, "STATUS")
        return None

    def gc(self, req: CniRequest) -> None:
        """Forget pods of this node whose sandbox the runtime no longer lists; remove their links."""
        valid = {a.container_id for a in req.conf.valid_attachments or ()}
        for topo in self.store.list(None):
            st = topo.status
            if st.node != self.node.name or not st.container_id or st.container_id in valid:
                continue
            self._log(event="gc", pod=topo.name, container=st.container_id[:12])
            stale = req.replace(container_id=st.container_id, netns=st.net_ns if netns.exists(st.net_ns) else "")
            self._delete_links(topo, stale)
        if req.conf.delegate is not None:
            self._eth0(req, "GC")
        return None

    # --- peers -----------------------------------------------------------------------------------

    def _backed(self, reqs: Sequence[PeerLink]) -> list[tuple[Topology, list[tuple[int, PeerLink]]]]:
        """Group a batch by local pod, each with its Topology, if the store backs every request.

        One request the store does not back refuses the whole batch (PeerDenied) before anything
        is done: a forged link never rides along with honest ones.
        """
        groups: dict[tuple[str, str], list[tuple[int, PeerLink]]] = {}
        for i, req in enumerate(reqs):
            groups.setdefault((req.namespace, req.pod), []).append((i, req))
        out: list[tuple[Topology, list[tuple[int, PeerLink]]]] = []
        for (namespace, pod), items in groups.items():
            try:
                topo = self.store.get(namespace, pod)
            except (StoreError, ManifestError) as e:
                raise PeerDenied(f"store: {e}") from e
            if topo is None:
                raise PeerDenied(f"no Topology {namespace}/{pod}")
            for _, req in items:
                link = topo.link(req.uid)
                if link is None or link.is_macvlan or link.peer_pod != req.peer_pod:
                    raise PeerDenied(f"{namespace}/{pod} has no link uid {req.uid} to {req.peer_pod}")
                want = (link.local_intf, link.peer_intf, _ip(link.local_ip), _ip(link.peer_ip), req.uid)
                # The VNI's block depends on both pods' status: peer_update checks it exactly; here
                # it must at least be this link's VNI in some block.
                got = (req.local_intf, req.peer_intf, req.local_ip, req.peer_ip, req.vni % naming.VNI_BLOCK_SIZE)
                if want != got or not naming.valid_block(req.vni // naming.VNI_BLOCK_SIZE):
                    raise PeerDenied(f"link uid {req.uid} of {namespace}/{pod} differs from the request")
            out.append((topo, items))
        return out

    def peer_update(self, reqs: Sequence[PeerLink]) -> list[str]:
        """Build or update this node's ends of a batch of vxlan links (one batch per calling node)."""
        groups = self._backed(reqs)
        work = []
        for topo, items in groups:
            st = topo.status
            if not st.alive or st.node != self.node.name:
                raise PeerDenied(f"{topo.namespace}/{topo.name} is not alive on node {self.node.name}")
            callers: dict[str, PeerState] = {}
            for _, req in items:
                if req.peer_pod not in callers:
                    caller = self.store.get(req.namespace, req.peer_pod)
                    if caller is None or not caller.status.alive or caller.status.src_ip != req.peer_vtep \
                            or caller.status.node == self.node.name:
                        raise PeerDenied(f"{req.namespace}/{req.peer_pod} is not alive behind VTEP {req.peer_vtep}")
                    callers[req.peer_pod] = PeerState(caller.name, True, caller.status.node, caller.status.src_ip,
                                                      vni_block=caller.status.vni_block)
                block = naming.link_block(topo.namespace, st.vni_block, callers[req.peer_pod].vni_block)
                if req.vni != naming.vni(topo.namespace, req.uid, block):
                    raise PeerDenied(f"link uid {req.uid} of {topo.namespace}/{topo.name}: VNI {req.vni} is not "
                                     f"the link's ({naming.vni(topo.namespace, req.uid, block)}, VNI block {block})")
            if not netns.exists(st.net_ns):
                raise PeerDenied(f"{topo.namespace}/{topo.name}: its network namespace {st.net_ns} is gone")
            work.append((topo, items, callers))
        actions = [""] * len(reqs)
        for topo, items, callers in work:
            ns_name = netns.resolve(topo.status.net_ns)
            plans = [(i, plan_remote_end(topo, req.uid, ns_name, self.node, callers[req.peer_pod])) for i, req in items]
            with self._link_locks(topo.namespace, [req.uid for _, req in items]):
                view = kernel_view(self.executor, [ns_name])[ns_name]
                commands: list[Command] = []
                for i, plan in plans:
                    entry = view.get(plan.local.intf)
                    if vxlan_matches(entry, plan):
                        if _configured(entry, plan.local):
                            actions[i] = "unchanged"
                            continue
                        commands += render([plan], "update")
                        actions[i] = "updated"
                    else:
                        commands += render([plan], "update" if entry else "add")
                        actions[i] = "updated" if entry else "created"
                if commands:
                    self.executor.apply(commands)
            # Record the interfaces too: they are what garbage collection may later remove.
            self._set_link_states(topo, [LinkStatus(p.uid, "vxlan", "up", "", p.local.intf) for _, p in plans])
        return actions

    def peer_remove(self, reqs: Sequence[PeerLink]) -> list[str]:
        """Remove this node's ends of links whose far pod (the caller's) went away."""
        actions = ["absent"] * len(reqs)
        for topo, items in self._backed(reqs):
            st = topo.status
            if not st.alive or st.node != self.node.name or not netns.exists(st.net_ns):
                continue
            ns_name = netns.resolve(st.net_ns)
            gone: list[PeerLink] = []
            with self._link_locks(topo.namespace, [req.uid for _, req in items]):
                view = kernel_view(self.executor, [ns_name])[ns_name]
                for i, req in items:
                    entry = view.get(req.local_intf)
                    data = (entry or {}).get("linkinfo", {}).get("info_data", {})
                    # Only an end that points at the caller goes: a newer incarnation elsewhere keeps its link.
                    if _kind(entry) == "vxlan" and data.get("remote") == req.peer_vtep and data.get("id") == req.vni:
                        actions[i] = "removed"
                        gone.append(req)
                if gone:
                    self.executor.remove([Command(ns_name, ("link", "del", r.local_intf), r.uid) for r in gone])
            # Exactly what a plan records for a pending link, so the next reconcile writes nothing.
            self._set_link_states(topo, [LinkStatus(r.uid, "", "pending", f"peer pod {r.peer_pod} is not up yet")
                                         for r in gone])
        return actions

    def _veth_peers_up(self, topo: Topology, plan: PodPlan, listed: Iterable[Topology]) -> None:
        """A veth built now also gave its peer pod (on this node, added earlier) the link it waits
        for: one status write per peer pod, however many links, and none when it already says so."""
        by_name = {t.name: t for t in listed}
        per_peer: dict[str, list[LinkStatus]] = {}
        for lp in plan.links:
            link = topo.link(lp.uid)
            if not isinstance(lp, VethPlan) or link is None or (peer := by_name.get(link.peer_pod)) is None:
                continue
            per_peer.setdefault(peer.name, []).append(LinkStatus(lp.uid, "veth", "up", "", lp.b.intf))
        for name, states in per_peer.items():
            peer = by_name[name]
            recorded = {s.uid: s for s in peer.status.links}
            waiting = {s.link_id for s in peer.status.skipped}
            if all(recorded.get(s.uid) == s and s.uid not in waiting for s in states):
                continue  # every write wakes every watcher: write only news
            self._set_link_states(peer, states)

    def _veth_peers_pending(self, topo: Topology, links: Iterable[Link], listed: Iterable[Topology]) -> None:
        """The pod goes: its veth peers on this node lost their ends with it; say so in their status
        (no reconcile pass is needed for that, and none runs for a clean DEL)."""
        by_name = {t.name: t for t in listed}
        per_peer: dict[str, list[LinkStatus]] = {}
        for lnk in links:
            peer = by_name.get(lnk.peer_pod)
            if peer is not None and peer.status.alive and peer.status.node == self.node.name:
                per_peer.setdefault(peer.name, []).append(
                    LinkStatus(lnk.uid, "", "pending", f"peer pod {topo.name} is not up yet"))
        for name, states in per_peer.items():
            self._set_link_states(by_name[name], states)

    def _set_link_states(self, topo: Topology, states: Sequence[LinkStatus]) -> None:
        """Record link states in the pod's status, in one write, and only if anything changes."""
        if not states:
            return
        container = topo.status.container_id
        by_uid = {s.uid: s for s in states}

        def write(cur: Topology) -> TopologyStatus | None:
            if cur.status.container_id != container:
                return None
            links = tuple(sorted([*(s for s in cur.status.links if s.uid not in by_uid), *by_uid.values()],
                                 key=lambda s: s.uid))
            # `skipped` lists the links still waiting for their peer pod: the links' new states decide.
            skipped = [s for s in cur.status.skipped if s.link_id not in by_uid]
            for uid, state in by_uid.items():
                link = cur.link(uid)
                if state.state == "pending" and link is not None:
                    skipped.append(Skip(link.peer_pod, uid))
            new = replace(cur.status, links=links, skipped=tuple(sorted(skipped, key=lambda s: s.link_id)))
            return None if new == cur.status else new

        self.store.update_status(topo.namespace, topo.name, write, known=topo)

    # --- reconcile --------------------------------------------------------------------------------

    def reconcile(self, only: Iterable[tuple[str, str]] | None = None) -> int:
        """Converge the pods alive on this node (all, or those in `only`); returns links changed.

        Level-triggered: it compares the store's desired links with the kernel, so it is right after
        a crash, a restart, a missed event or a hot change alike.
        """
        wanted = set(only) if only is not None else None
        topologies = self.store.list(None)
        by_namespace: dict[str, list[Topology]] = {}
        for t in topologies:
            by_namespace.setdefault(t.namespace, []).append(t)
            # Only seed what the watch has not reported yet: `affected` diffs each event against the
            # watch's previous copy, and a pass that listed a change first would make it look like
            # no change at all (the event's pod would never be looked at).
            self._seen.setdefault(t.key, t)
        changed = 0
        alive = {t.key for t in topologies if t.status.alive}
        here = {t.key for t in topologies if t.status.alive and t.status.node == self.node.name}
        for key in [k for k in (*self._far_owed, *self._clashes) if k not in here]:
            # Gone, or not on this node any more: nothing to retry for it here.
            self._far_owed.pop(key, None)
            self._clashes.pop(key, None)
        for topo in topologies:
            if wanted is not None and topo.key not in wanted:
                continue
            if wanted is not None and topo.key in self._maybe_settled:
                self._maybe_settled.discard(topo.key)
                peers = {lnk.uid: lnk.peer_pod for lnk in topo.links}
                if not any(s.state in ("pending", "error") and (topo.namespace, peers.get(s.uid, "")) in alive
                           for s in topo.status.links):
                    continue
            if topo.status.alive and topo.status.node == self.node.name:
                changed += self.reconcile_pod(topo, by_namespace[topo.namespace])
        return changed

    def reconcile_pod(self, topo: Topology, namespace_topologies: Iterable[Topology]) -> int:
        st = topo.status
        if not netns.exists(st.net_ns):
            self._log(event="stale-netns", pod=topo.name, net_ns=st.net_ns)
            self.store.update_status(topo.namespace, topo.name, _forget_vanished(st.container_id))
            return 0
        if self._block_lost(topo):
            topo = self._move_block(topo)
            st = topo.status
        ns_name = netns.resolve(st.net_ns)
        plan = plan_pod(topo, ns_name, self.node, self._peer_states(namespace_topologies))
        errors: dict[int, str] = {}
        uids = {p.uid for p in plan.links} | {s.uid for s in st.links}
        with self._link_locks(topo.namespace, uids):
            view = kernel_view(self.executor, [ns_name, *(e.netns for p in plan.links for e in p.ends)])
            stale = self._stale(topo, ns_name, view.get(ns_name, {}), self._orphans(topo, plan, view.get(ns_name, {})))
            todo = self._differences(plan.links, view)
            if stale:
                for problem in self.executor.remove(stale):
                    self._log(event="gc-problem", pod=topo.name, error=problem)
            if todo:
                try:
                    self.executor.apply(todo)
                except ExecError as e:
                    self._log(event="reconcile-failed", pod=topo.name, error=str(e))
                    errors = {c.uid: str(e) for c in todo}
                    if _vni_clash(e):
                        self._clashes[topo.key] = self._clashes.get(topo.key, 0) + 1
                else:
                    self._clashes.pop(topo.key, None)
        if stale or todo:
            self._log(event="reconciled", pod=topo.name, removed=[c.argv[2] for c in stale],
                      changed=sorted({c.uid for c in todo}))
        errors.update(self._retry_far_ends(topo, plan, errors))
        self._record(topo, st.container_id, plan, errors)
        return len({c.uid for c in todo}) + len(stale)

    def take_retries(self) -> set[tuple[str, str]]:
        """Pods to look at again now: their last pass met a VNI clash (at most MAX_CLASH_RETRIES
        passes in a row; after that the periodic resync and new events do), or a peer daemon that
        owes them far ends may be asked again."""
        due = {key for key, count in self._clashes.items() if count <= MAX_CLASH_RETRIES}
        for key in [k for k, c in self._clashes.items() if c > MAX_CLASH_RETRIES]:
            del self._clashes[key]
        # Pods owed far ends by a peer daemon that may be asked again now.
        due |= {key for key, owed in list(self._far_owed.items())
                if any(self._peers_backoff.due(address) for address in owed)}
        self._maybe_settled -= due  # they are looked at, whatever their status seems to say
        return due

    def _move_block(self, topo: Topology) -> Topology:
        """Record another VNI block for a pod whose block a namespace with a smaller name also
        recorded (both came up at once); the pass that follows rebuilds its vxlan links with it, and
        the status change makes its peers' daemons rebuild their ends."""
        old, new = topo.status.vni_block, self._vni_block(topo)
        container = topo.status.container_id

        def move(cur: Topology) -> TopologyStatus | None:
            if cur.status.container_id != container or cur.status.vni_block != old:
                return None
            return replace(cur.status, vni_block=new)

        self._log(event="vni-block-moved", pod=topo.name, namespace=topo.namespace, old=old, new=new)
        return self.store.update_status(topo.namespace, topo.name, move, known=topo) or topo

    def _orphans(self, topo: Topology, plan: PodPlan, view: Mapping[str, Mapping[str, Any]]) -> set[str]:
        """Interfaces of links whose peer is gone (pending): a veth or vxlan end left towards a pod
        that died or moved away. The peers are read again first, so a peer that came alive after
        this pass listed the store keeps the end its ADD just built (its event brings another pass)."""
        names = {lnk.uid: lnk.local_intf for lnk in topo.links}
        left = {p.peer_pod: names[p.uid] for p in plan.pending if _kind(view.get(names[p.uid])) in ("veth", "vxlan")}
        if not left:
            return set()
        fresh = self._peer_states(t for pod in left if (t := self.store.get(topo.namespace, pod)) is not None)
        return {intf for pod, intf in left.items() if pod not in fresh or not fresh[pod].alive}

    def _stale(self, topo: Topology, ns_name: str, view: Mapping[str, Mapping[str, Any]],
               orphans: Iterable[str] = ()) -> list[Command]:
        """Interfaces meshnet made in this pod that no desired link owns any more (garbage).

        Only interfaces in meshnet's link group, names meshnet recorded in the pod's status, vxlan
        devices with a VNI of the pod's namespace block, and `orphans` (ends of links whose peer is
        gone) are candidates: nothing another plugin made is ever touched.
        """
        orphaned = set(orphans)
        desired = {lnk.local_intf for lnk in topo.links} - orphaned
        blocks = {naming.vni_block(topo.namespace), topo.status.vni_block}
        ours = {s.intf for s in topo.status.links if s.intf} | orphaned
        for name, entry in view.items():
            vni = entry.get("linkinfo", {}).get("info_data", {}).get("id")
            if str(entry.get("group")) == str(naming.LINK_GROUP) or (
                    _kind(entry) == "vxlan" and isinstance(vni, int) and vni // naming.VNI_BLOCK_SIZE in blocks):
                ours.add(name)
        return [Command(ns_name, ("link", "del", name)) for name in sorted(ours - desired) if name in view]

    def affected(self, event_type: str, topo: Topology) -> set[tuple[str, str]]:
        """Pods of this node a store change concerns. Status writes that only record link states
        (ours included) concern nobody, so reconciling never feeds itself."""
        old = self._seen.get(topo.key)
        if event_type == "DELETED":
            self._seen.pop(topo.key, None)
            if old is not None and old.status.alive and old.status.node == self.node.name:
                self._remove_all(old)
        else:
            self._seen[topo.key] = topo
        spec_changed = old is None or old.links != topo.links or event_type == "DELETED"
        # A clean DEL (status emptied) removed its links itself — the far ends of veths die with
        # them, remote vxlan ends were told — so its peers need no pass; a crash or a move does.
        clean_del = event_type == "MODIFIED" and topo.status == TopologyStatus()
        moved = (old is not None and old.status.alive and not clean_del and (not topo.status.alive or
                 (old.status.net_ns, old.status.node) != (topo.status.net_ns, topo.status.node)))
        # Only daemons write statuses: a write about a pod on a node whose daemon failed us is news
        # that it is back, so the far ends held back for it are asked for again at once.
        peer = f"{topo.status.src_ip}:{self.grpc_port}"
        if (event_type != "DELETED" and topo.status.src_ip and (old is None or old.status != topo.status)
                and self._peers_backoff.back(peer)):
            self._log(event="peer-back", peer=peer, pod=topo.name)
        out: set[tuple[str, str]] = set()
        settled_only: set[tuple[str, str]] = set()
        old_block = old.status.vni_block if old is not None else 0
        new_block = topo.status.vni_block if event_type != "DELETED" else 0
        # A pod coming alive or going is handled below like before; a block that changes while it
        # stays alive (it moved) changes its links' VNIs, so its peers need a pass too.
        block_changed = bool(old_block and new_block and old_block != new_block)
        if new_block or (old_block and old_block != new_block):
            # VNI blocks are per namespace: a pod of another namespace may have to give up the block
            # this one recorded (naming.block_lost), or may have been waiting for the one it left.
            for other in self._seen.values():
                if (other.namespace != topo.namespace and self._local(other)
                        and other.status.vni_block in {new_block, old_block} - {0}):
                    out.add(other.key)
        if event_type != "DELETED" and self._local(topo) and (spec_changed or self._unsettled(topo)):
            out.add(topo.key)
            if not spec_changed:
                settled_only.add(topo.key)
        for other in self._seen.values():
            if (other.namespace == topo.namespace and self._local(other)
                    and any(lnk.peer_pod == topo.name for lnk in other.links)):
                # A peer that came alive (or changed at all) is worth another look for links
                # still pending or in error towards it: its ADD may have raced with ours.
                if spec_changed or moved or block_changed:  # a new block: the links' VNIs change
                    out.add(other.key)
                elif self._unsettled(other, topo.name):
                    out.add(other.key)
                    settled_only.add(other.key)
        # Pods queued only because their status looked unsettled are looked at again just before
        # the pass: the ADD that woke them usually settles them first (no kernel read needed).
        self._maybe_settled |= settled_only
        self._maybe_settled -= out - settled_only
        return out

    def _local(self, topo: Topology) -> bool:
        return topo.status.alive and topo.status.node == self.node.name

    def _unsettled(self, topo: Topology, peer: str = "") -> bool:
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
            seen = self._seen.get((topo.namespace, pod))
            if s.state == "pending" and seen is not None and seen.status.alive:
                return True
        return False

    def _remove_all(self, topo: Topology) -> None:
        """A Topology deleted while its pod runs: the pod keeps eth0 and loses meshnet's links."""
        if not netns.exists(topo.status.net_ns):
            return
        ns_name = netns.resolve(topo.status.net_ns)
        with self._link_locks(topo.namespace, (lnk.uid for lnk in topo.links)):
            self.executor.remove([Command(ns_name, ("link", "del", lnk.local_intf), lnk.uid) for lnk in topo.links])
        self._log(event="topology-deleted", pod=topo.name)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._delegates.shutdown(wait=False, cancel_futures=True)
