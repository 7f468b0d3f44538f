"""An emulated Kubernetes cluster on one machine: nodes and pods are network namespaces.

Each node runs a real `meshnetd` inside its namespace; pods get their interfaces the way a
kubelet gives them: the real `meshnet` CNI binary is executed with CNI_* in its environment and
the network config on stdin, and delegates eth0 to the real `bridge` + `host-local` plugins.
Everything a lab makes is named `mnl-<lab>-…` and listed in its state file, so `down` removes it all.

`Lab` is the front: it brings a lab up, changes it and takes it down, and hands everything else to
its rooms — `state` (names, the state file), `processes` (the daemons), `kubelet` (pods) and
`reports` (status, summary, pings).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from meshnet import naming
from meshnet.command import Command
from meshnet.daemon.netns import NETNS_DIR
from meshnet.dryrun import (
    UNDERLAY,
    LabLayout,
    every_link_plan,
    external_addresses,
    infra_commands,
    place_pods,
    pod_key,
    pod_names,
    simulate_adds,
)
from meshnet.executor import Executor
from meshnet.lab import limits
from meshnet.lab.kubelet import POD_SUBNET, Kubelet, check_cni_plugins, default_cni_bin, pod_bridge_commands
from meshnet.lab.processes import Supervisor
from meshnet.lab.reports import Reports
from meshnet.lab.state import LAB_ROOT, LabError, LabNames, LabState, PodRecord, StateFile, check_lab_name
from meshnet.model import Manifest, Topology, TopologyStatus, load_manifest
from meshnet.plan import NodeInfo

# How long `lab up` waits for every link's state to reach the store, beyond the ADDs: well above
# the window in which a busy meshnetd gathers its peers' news (link_status.COALESCE_SECONDS).
SETTLE_SECONDS = 30.0


def lab_manifest(path: str | Path) -> Manifest:
    """A manifest the lab can run: the lab names pods (namespaces, `lab exec POD`) by name alone,
    so one pod name in two namespaces is refused rather than one pod silently replacing the other."""
    manifest = load_manifest(path)
    first: dict[str, str] = {}
    for p in manifest.pods:
        if p.name in first and first[p.name] != p.namespace:
            raise LabError(f"{path}: Pod {p.namespace}/{p.name}: metadata.name is also the name of Pod "
                           f"{first[p.name]}/{p.name}; the lab names pods by name alone, so rename one of them")
        first.setdefault(p.name, p.namespace)
    return manifest


class Lab:
    def __init__(self, name: str, root: Path = LAB_ROOT, *, progress: Callable[[str], None] | None = None) -> None:
        self.names = LabNames(check_lab_name(name), root / name)
        self.executor = Executor()
        self._progress = progress or (lambda _msg: None)
        self.file = StateFile(self.names)
        self.processes = Supervisor(self.names, self.file)
        self.kubelet = Kubelet(self.names, self.file, self.executor, self._progress)
        self.reports = Reports(self.names, self.file, self.executor)

    # --- names, paths and state (meshnet.lab.state) ----------------------------------------------

    @property
    def name(self) -> str:
        return self.names.name

    @property
    def dir(self) -> Path:
        return self.names.dir

    @property
    def prefix(self) -> str:
        return self.names.prefix

    def node_netns(self, i: int) -> str:
        return self.names.node_netns(i)

    @property
    def external_netns(self) -> str:
        return self.names.external_netns

    def pod_netns(self, pod: str) -> str:
        return self.names.pod_netns(pod)

    def socket(self, node: str) -> Path:
        return self.names.socket(node)

    def topology_index(self, node: str) -> Path:
        return self.names.topology_index(node)

    @property
    def state_path(self) -> Path:
        return self.names.state_path

    def node_info(self, i: int) -> NodeInfo:
        return self.names.node_info(i)

    @property
    def state(self) -> LabState:
        return self.file.state

    def save(self) -> None:
        self.file.save()

    def exists(self) -> bool:
        return self.file.exists()

    def manifest(self) -> Manifest:
        return self.reports.manifest()

    # --- bring-up and change -----------------------------------------------------------------------

    def up(self, manifest_path: str, nodes: int, *, store: str = "sqlite", kubeconfig: str = "",
           cni_bin: list[str] | None = None, workers: int = 8, cni_env_path: str = "",
           raise_neigh_limits: bool = False) -> dict[str, Any]:
        if self.exists():
            raise LabError(f"lab {self.name!r} is already up; `meshnetctl lab down --name {self.name}` first")
        if not 1 <= nodes <= 50:
            raise LabError(f"--nodes: {nodes} is outside 1..50")
        manifest = lab_manifest(manifest_path)
        for p in manifest.pods:
            why = naming.netns_problem(self.pod_netns(p.name))
            if why:
                raise LabError(f"pod {p.namespace}/{p.name}: name too long for the lab: {why}")
        per_node: dict[str, int] = {}
        for i in place_pods(manifest, nodes).values():
            per_node[f"node{i}"] = per_node.get(f"node{i}", 0) + 1
        limits.check_pod_capacity(per_node, nodes, POD_SUBNET)
        neighbours = limits.neigh_entries(manifest)
        warning = None if raise_neigh_limits else limits.neigh_warning(neighbours)
        if warning:
            self._progress(warning)
        check_cni_plugins()
        if store == "sqlite":
            store_url = f"sqlite://{self.dir / 'store.db'}"
        elif store == "kube":
            store_url = f"kube:?kubeconfig={kubeconfig}" if kubeconfig else "kube"
        else:
            raise LabError(f"--store: {store!r} is not sqlite or kube")
        started = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        placement = place_pods(manifest, nodes)
        state = LabState(self.name, str(Path(manifest_path).resolve()), [f"node{i}" for i in range(nodes)],
                         store_url, cni_bin or default_cni_bin(), cni_env_path=cni_env_path)
        for p in manifest.pods:
            key = pod_key(p.namespace, p.name)
            state.pods[p.name] = PodRecord(p.name, p.namespace, f"node{placement[key]}", self.pod_netns(p.name))
        self.file.create(state)
        try:
            if raise_neigh_limits:
                raised = limits.raise_limits(self.dir, neighbours)
                self._progress(f"neighbour table limits raised for the lab: {raised}")
            self._progress(f"lab {self.name}: {nodes} node(s), underlay {UNDERLAY}")
            self._build_infra(manifest, nodes)
            if store == "kube":
                self.forward_loopback_api(kubeconfig)
            self.load_topologies(manifest)
            self._keep_applied(Path(manifest_path).read_text())
            for i in range(nodes):
                self.start_daemon(f"node{i}")
            for i in range(nodes):
                self.wait_daemon(f"node{i}")
            self._progress(f"{nodes} meshnetd running; adding {len(manifest.pods)} pod(s)")
            self.add_pods(list(self.state.pods), workers=workers)
            self.wait_settled()
        except BaseException:
            self.save()
            raise
        self.save()
        return self.summary(time.monotonic() - started)

    def _keep_applied(self, text: str) -> None:
        """Keep the text the lab now runs: the next `lab apply` compares with it (the file it came from
        may be edited in place). Written whole or not at all."""
        tmp = self.names.applied.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(self.names.applied)

    def _build_infra(self, manifest: Manifest, nodes: int) -> None:
        infos = tuple(self.node_info(i) for i in range(nodes))
        # The external namespace needs an address in each macvlan link's subnet to ping it.
        plans = every_link_plan(simulate_adds(manifest, self._layout(manifest, nodes)))
        bridges = [c for i, info in enumerate(infos) if info.netns for c in pod_bridge_commands(info.netns, i)]
        self.executor.run_sequence(infra_commands(self.prefix, infos, external_addresses(plans)) + bridges)

    def _layout(self, manifest: Manifest, nodes: int) -> LabLayout:
        infos = tuple(self.node_info(i) for i in range(nodes))
        keys = pod_names(manifest)
        recs = {pod_key(r.namespace, r.name): r for r in self.state.pods.values()}
        return LabLayout(infos, {k: recs[k].node for k in keys}, {k: recs[k].netns for k in keys})

    def load_topologies(self, manifest: Manifest) -> None:
        from meshnet.store import open_store

        store = open_store(self.state.store_url)
        try:
            for t in manifest.topologies:
                store.apply(Topology(t.name, t.namespace, t.links))
        finally:
            store.close()

    def apply(self, manifest_path: str, workers: int = 8) -> dict[str, list[str]]:
        """Hot change: make the running lab match an edited manifest.

        Compared with what the lab last applied (its own copy: the file may have been edited in place).
        Topologies are written to the store (the daemons watch it and rewire running pods), removed
        ones deleted; new pods are added like a kubelet would, pods gone from the file are deleted.
        The comparison, the store and the state file change under the lab's lock; the CNI calls
        run after it (other commands on other pods go on meanwhile).
        """
        from meshnet.store import open_store

        text = Path(manifest_path).read_text()
        manifest = lab_manifest(manifest_path)
        changed: list[str] = []
        removed: list[str] = []
        with self.file.transaction() as st:
            old = self.manifest()
            new_keys = {t.key for t in manifest.topologies}
            store = open_store(st.store_url)
            try:
                for t in manifest.topologies:
                    before = old.topology(t.namespace, t.name)
                    if before is None or before.links != t.links:
                        store.apply(Topology(t.name, t.namespace, t.links))
                        changed.append(t.name)
                for t in old.topologies:
                    if t.key not in new_keys:
                        store.delete(t.namespace, t.name)
                        removed.append(t.name)
            finally:
                store.close()
            new_pods = {p.name: p for p in manifest.pods}
            gone = [name for name in st.pods if name not in new_pods]
            added = [p.name for p in manifest.pods if p.name not in st.pods]
            for i, name in enumerate(added):
                p = new_pods[name]
                rr = st.nodes[(len(st.pods) + i) % len(st.nodes)]
                node = p.node_name if p.node_name in st.nodes else rr
                st.pods[name] = PodRecord(name, p.namespace, node, self.pod_netns(name))
            st.manifest = str(Path(manifest_path).resolve())
            self._keep_applied(text)
        for name in gone:
            self.del_pod(name)
            with self.file.transaction() as st:
                st.pods.pop(name, None)
        if added:
            self.add_pods(added, workers=workers)
        return {"changed": changed, "removed": removed, "pods_added": added, "pods_removed": gone}

    # --- the daemons (meshnet.lab.processes) ----------------------------------------------------------

    def start_daemon(self, node: str) -> int:
        return self.processes.start_daemon(node)

    def wait_daemon(self, node: str, timeout: float = 30.0) -> None:
        self.processes.wait_daemon(node, timeout)

    def stop_daemon(self, node: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        self.processes.stop_daemon(node, sig, timeout)

    def restart_daemon(self, node: str) -> None:
        self.processes.restart_daemon(node)

    def forward_loopback_api(self, kubeconfig: str) -> None:
        self.processes.forward_loopback_api(kubeconfig)

    # --- pods (meshnet.lab.kubelet) ------------------------------------------------------------------

    def cni_config(self, node: str) -> dict[str, Any]:
        return self.kubelet.cni_config(node)

    def cni(self, command: str, rec: PodRecord) -> tuple[int, dict[str, Any]]:
        return self.kubelet.cni(command, rec)

    def add_pod(self, pod: str, *, retry_for: float | None = None) -> PodRecord:
        return self.kubelet.add_pod(pod, retry_for=retry_for)

    def add_pods(self, pods: list[str], workers: int = 8) -> None:
        self.kubelet.add_pods(pods, workers)

    def del_pod(self, pod: str, *, remove_netns: bool = True) -> PodRecord:
        return self.kubelet.del_pod(pod, remove_netns=remove_netns)

    def restart_pod(self, pod: str, node: str = "") -> PodRecord:
        return self.kubelet.restart_pod(pod, node)

    # --- looking at it (meshnet.lab.reports) ---------------------------------------------------------

    def kernel_links(self, netns: str) -> dict[str, dict[str, Any]]:
        return self.reports.kernel_links(netns)

    def status(self) -> dict[str, Any]:
        return self.reports.status()

    def wait_settled(self, timeout: float = SETTLE_SECONDS) -> list[str]:
        """Wait until every link between two pods that are up has both ends' state recorded in the
        store (up, down or an error): the daemons gather their peers' news about a pod's links
        while busy and write it up to a window later (link_status.COALESCE_SECONDS). Returns what
        is still unsettled after `timeout` seconds, and says so."""
        deadline = time.monotonic() + timeout
        manifest = self.manifest()  # read once: a big lab's manifest takes a while to parse
        while True:
            left = self.reports.unsettled(manifest)
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if left:
            more = f" (and {len(left) - 5} more)" if len(left) > 5 else ""
            self._progress(f"after {timeout:.0f}s, {len(left)} link end(s) still have no settled state in the "
                           f"store: {'; '.join(left[:5])}{more} — see `meshnetctl lab status --name {self.name}`")
        return left

    def summary(self, seconds: float) -> dict[str, Any]:
        return self.reports.summary(seconds)

    def connectivity(self, attempts: int = 3) -> list[dict[str, Any]]:
        return self.reports.connectivity(attempts)

    # --- tear-down -----------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop the daemons, then remove every namespace and file of the lab at once. Also when the
        state file is damaged or missing: the lab's daemons and relay are found by their command
        lines, its namespaces by the `mnl-<lab>-` prefix.

        No CNI DEL per pod: everything a DEL undoes goes with the lab as a whole — the pod
        namespaces with every link in them (a veth's far end and the VXLANs with them), the node
        namespaces with the eth0 bridge, the IPAM files and the SQLite store in the lab's directory.
        750 DELs one pod at a time (8 at once) took minutes, removing links one by one in the
        kernel and telling every peer. The daemons stop first, so nothing rebuilds or reports
        while the namespaces go. Only a Kubernetes store outlives the lab: there each pod's
        Topology status is reset as its DEL would have reset it."""
        problems: list[str] = []
        st: LabState | None = None
        if self.exists():
            try:
                st = self.file.reload()
            except LabError as e:  # damaged: everything is still removed by name below
                problems.append(str(e))
        self.processes.stop_all()
        leftovers = sorted(p.name for p in NETNS_DIR.glob(f"{self.prefix}*")) if NETNS_DIR.exists() else []
        if leftovers:
            problems += self.executor.run_best_effort([Command(None, ("netns", "del", n)) for n in leftovers])
        if st is not None and not st.store_url.startswith("sqlite:"):
            problems += self._forget_statuses(st)
        problems += limits.restore_limits(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.file.forget()
        return problems

    def _forget_statuses(self, st: LabState) -> list[str]:
        """What each pod's DEL does in the store: its Topology's status emptied, unless a sandbox
        other than the lab's own owns it. One LIST per namespace, then one status write per pod."""
        from meshnet.store import open_store
        from meshnet.store.base import StoreError

        mine = {(r.namespace, r.name): r.container_id for r in st.pods.values() if r.container_id}
        if not mine:
            return []
        problems: list[str] = []
        try:
            store = open_store(teardown_store_url(st.store_url))
        except (StoreError, OSError, ValueError) as e:
            return [f"store {st.store_url.split('?')[0]}: cannot reset the pods' status: {e}"]
        try:
            known = [t for ns in sorted({ns for ns, _ in mine}) for t in store.list(ns)
                     if t.key in mine and t.status.container_id]

            def reset(t: Topology) -> str:
                def clear(cur: Topology) -> TopologyStatus | None:
                    if cur.status.container_id not in ("", mine[t.key]):
                        return None  # a sandbox the lab did not make owns the pod now
                    return None if cur.status == TopologyStatus() else TopologyStatus()

                try:
                    store.update_status(t.namespace, t.name, clear, known=t)
                except (StoreError, OSError) as e:
                    return f"Topology {t.namespace}/{t.name}: resetting its status failed: {e}"
                return ""

            with ThreadPoolExecutor(max_workers=8) as pool:
                problems += [p for p in pool.map(reset, known) if p]
        except (StoreError, OSError) as e:
            problems.append(f"store {st.store_url.split('?')[0]}: cannot reset the pods' status: {e}")
        finally:
            store.close()
        return problems


# `lab down` resets every pod's status with the Kubernetes store: one client, once, not a node's
# daemon among many. At the daemons' client-side limit (50 per second) 750 pods took 15-23 s;
# kubectl itself leaves the pacing to the API server's priority and fairness.
TEARDOWN_QPS = 250.0
TEARDOWN_BURST = 250


def teardown_store_url(url: str) -> str:
    """The lab's store URL for its teardown: a Kubernetes store's rate limit raised to at least
    TEARDOWN_QPS / TEARDOWN_BURST (a higher one the URL sets is kept); any other URL as it is."""
    parts = urlsplit("kube:" if url == "kube" else url)
    if parts.scheme != "kube":
        return url
    options = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
    try:
        qps, burst = float(options.get("qps", "0")), int(options.get("burst", "0"))
    except ValueError:
        return url  # open_store names the bad value
    options["qps"] = f"{max(qps, TEARDOWN_QPS):g}"
    options["burst"] = str(max(burst, TEARDOWN_BURST))
    return urlunsplit(parts._replace(query=urlencode(options)))
