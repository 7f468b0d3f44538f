"""An emulated Kubernetes cluster on one machine: nodes and pods are network namespaces.

Each node runs a real `meshnetd` inside its namespace; pods get their interfaces the way a
kubelet gives them: the real `meshnet` CNI binary is executed with CNI_* in its environment and
the network config on stdin, and delegates eth0 to the real `bridge` + `host-local` plugins.
Everything a lab makes is named `mnl-<lab>-…` and listed in its state file, so `down` removes it all.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshnet import naming
from meshnet.command import Command
from meshnet.dryrun import UNDERLAY, external_addresses, infra_commands
from meshnet.executor import ExecError, Executor
from meshnet.model import Manifest, ManifestError, Topology, load_manifest
from meshnet.plan import LabLayout, NodeInfo, every_link_plan, place_pods, pod_key, pod_names, simulate_adds

LAB_ROOT = Path(os.environ.get("MESHNET_LAB_ROOT", "/run/meshnet/labs"))
NETNS_DIR = Path("/var/run/netns")
POD_SUBNET = "203.0.113.0/24"  # eth0 of the pods; every node has its own bridge, so subnets may repeat
CNI_PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
GRPC_PORT = 51111
FORWARDER = "kube-api-forward"  # key of the API relay's pid in LabState.daemons


class LabError(Exception):
    pass


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


@dataclass
class PodRecord:
    name: str
    namespace: str
    node: str
    netns: str
    container_id: str = ""
    state: str = "new"  # new | up | failed | down
    error: str = ""
    links: int = 0
    seconds: float = 0.0


@dataclass
class LabState:
    name: str
    manifest: str
    nodes: list[str]
    store_url: str
    cni_bin: list[str]
    pods: dict[str, PodRecord] = field(default_factory=dict)
    daemons: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    # PATH the CNI binary is run with ("" = this process's): a kubelet host's, e.g. one without Python.
    cni_env_path: str = ""

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> LabState:
        raw = json.loads(path.read_text())
        raw["pods"] = {k: PodRecord(**v) for k, v in raw.get("pods", {}).items()}
        return cls(**raw)


def check_lab_name(name: str) -> str:
    if not name or len(name) > 12 or not name.replace("-", "").isalnum() or not name[0].isalnum():
        raise LabError(f"--name: {name!r} must be 1-12 letters, digits or '-'")
    return name


def default_cni_bin() -> list[str]:
    """The shim as a host without meshnet's venv would run it: this Python with no site packages
    (-S -E; the shim needs only the standard library), which starts ~20 ms faster than the venv's
    console script. `--cni-bin` runs another binary, e.g. the standalone one (`make cni-binary`)."""
    root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {root!r}); from meshnet.cni.shim import main; sys.exit(main())"
    return [sys.executable, "-S", "-E", "-c", code]


class Lab:
    def __init__(self, name: str, root: Path = LAB_ROOT, *, progress: Callable[[str], None] | None = None) -> None:
        self.name = check_lab_name(name)
        self.dir = root / name
        self.prefix = f"mnl-{name}-"
        self.executor = Executor()
        self._progress = progress or (lambda _msg: None)
        self._state: LabState | None = None
        # Daemons this object started: waited for when stopped (no zombie, no ResourceWarning).
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._save_lock = threading.Lock()  # pods are added and deleted from worker threads

    # --- names and paths -------------------------------------------------------------------------

    def node_netns(self, i: int) -> str:
        return f"{self.prefix}node{i}"

    @property
    def external_netns(self) -> str:
        return f"{self.prefix}ext"

    def pod_netns(self, pod: str) -> str:
        return f"{self.prefix}p-{pod}"

    def socket(self, node: str) -> Path:
        return self.dir / f"{node}.sock"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def state(self) -> LabState:
        if self._state is None:
            if not self.state_path.exists():
                raise LabError(f"no lab named {self.name!r} (no {self.state_path})")
            self._state = LabState.load(self.state_path)
        return self._state

    def save(self) -> None:
        with self._save_lock:
            self.state.save(self.state_path)

    def exists(self) -> bool:
        return self.state_path.exists()

    def node_info(self, i: int) -> NodeInfo:
        return NodeInfo(f"node{i}", str(UNDERLAY[i + 1]), "eth0", self.node_netns(i))

    def manifest(self) -> Manifest:
        return load_manifest(self.state.manifest)

    # --- bring-up ----------------------------------------------------------------------------------

    def up(self, manifest_path: str, nodes: int, *, store: str = "sqlite", kubeconfig: str = "",
           cni_bin: list[str] | None = None, workers: int = 8, cni_env_path: str = "") -> dict[str, Any]:
        if self.exists():
            raise LabError(f"lab {self.name!r} is already up; `meshnetctl lab down --name {self.name}` first")
        if not 1 <= nodes <= 50:
            raise LabError(f"--nodes: {nodes} is outside 1..50")
        manifest = lab_manifest(manifest_path)
        for p in manifest.pods:
            why = naming.netns_problem(self.pod_netns(p.name))
            if why:
                raise LabError(f"pod {p.namespace}/{p.name}: name too long for the lab: {why}")
        for plugin in ("bridge", "host-local"):
            if not any((Path(d) / plugin).exists() for d in CNI_PLUGIN_DIRS):
                raise LabError(f"CNI plugin {plugin} not found in {', '.join(CNI_PLUGIN_DIRS)} "
                               "(install Debian's containernetworking-plugins: `make setup`)")
        if store == "sqlite":
            store_url = f"sqlite://{self.dir / 'store.db'}"
        elif store == "kube":
            store_url = f"kube:?kubeconfig={kubeconfig}" if kubeconfig else "kube"
        else:
            raise LabError(f"--store: {store!r} is not sqlite or kube")
        started = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        placement = place_pods(manifest, nodes)
        self._state = LabState(self.name, str(Path(manifest_path).resolve()), [f"node{i}" for i in range(nodes)],
                               store_url, cni_bin or default_cni_bin(), cni_env_path=cni_env_path)
        for p in manifest.pods:
            key = pod_key(p.namespace, p.name)
            self.state.pods[p.name] = PodRecord(p.name, p.namespace, f"node{placement[key]}",
                                                self.pod_netns(p.name))
        self.save()
        try:
            self._progress(f"lab {self.name}: {nodes} node(s), underlay {UNDERLAY}")
            self._build_infra(manifest, nodes)
            if store == "kube":
                self.forward_loopback_api(kubeconfig)
            self.load_topologies(manifest)
            for i in range(nodes):
                self.start_daemon(f"node{i}")
            for i in range(nodes):
                self.wait_daemon(f"node{i}")
            self._progress(f"{nodes} meshnetd running; adding {len(manifest.pods)} pod(s)")
            self.add_pods(list(self.state.pods), workers=workers)
        except BaseException:
            self.save()
            raise
        self.save()
        return self.summary(time.monotonic() - started)

    def _build_infra(self, manifest: Manifest, nodes: int) -> None:
        infos = tuple(self.node_info(i) for i in range(nodes))
        # The external namespace needs an address in each macvlan link's subnet to ping it.
        plans = every_link_plan(simulate_adds(manifest, self._layout(manifest, nodes)))
        self.executor.run_sequence(infra_commands(self.prefix, infos, external_addresses(plans)))

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

    def forward_loopback_api(self, kubeconfig: str) -> None:
        """Node namespaces have their own `lo`: relay a loopback API server's port into each of them."""
        port = loopback_api_port(kubeconfig)
        if port is None:
            return
        argv = [sys.executable, "-m", "meshnet.lab.forward", "--port", str(port),
                *(self.node_netns(i) for i in range(len(self.state.nodes)))]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        # Kept with the daemons so that `down` stops it like one (and waits for it: no zombie).
        self._children[proc.pid] = proc
        self.state.daemons[FORWARDER] = proc.pid
        self.save()
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.wait(timeout=10)
            raise LabError(f"cannot relay the Kubernetes API port {port} into the nodes: "
                           f"{proc.stderr.read().decode(errors='replace').strip()}")
        proc.stdout.close()
        proc.stderr.close()

    def apply(self, manifest_path: str, workers: int = 8) -> dict[str, list[str]]:
        """Hot change: make the running lab match an edited manifest.

        Topologies are written to the store (the daemons watch it and rewire running pods), removed
        ones deleted; new pods are added like a kubelet would, pods gone from the file are deleted.
        """
        from meshnet.store import open_store

        manifest = lab_manifest(manifest_path)
        old = self.manifest()
        new_keys = {t.key for t in manifest.topologies}
        store = open_store(self.state.store_url)
        changed: list[str] = []
        removed: list[str] = []
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
        gone = [name for name in self.state.pods if name not in new_pods]
        for name in gone:
            self.del_pod(name)
            del self.state.pods[name]
        added = [p.name for p in manifest.pods if p.name not in self.state.pods]
        nodes = len(self.state.nodes)
        for i, name in enumerate(added):
            p = new_pods[name]
            rr = self.state.nodes[(len(self.state.pods) + i) % nodes]
            node = p.node_name if p.node_name in self.state.nodes else rr
            self.state.pods[name] = PodRecord(name, p.namespace, node, self.pod_netns(name))
        self.state.manifest = str(Path(manifest_path).resolve())
        self.save()
        if added:
            self.add_pods(added, workers=workers)
        return {"changed": changed, "removed": removed, "pods_added": added, "pods_removed": gone}

    def start_daemon(self, node: str) -> int:
        i = self.state.nodes.index(node)
        info = self.node_info(i)
        sock = self.socket(node)
        sock.unlink(missing_ok=True)
        log = open(self.dir / f"{node}.log", "ab")  # noqa: SIM115 - handed to the child process
        argv = ["ip", "netns", "exec", self.node_netns(i), sys.executable, "-m", "meshnet.daemon.main",
                "--node-name", node, "--host-ip", info.vtep_ip, "--socket", str(sock),
                "--store", self.state.store_url, "--grpc-port", str(GRPC_PORT),
                "--journal", str(self.dir / f"{node}.journal"), "--resync", "30"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        log.close()
        self._children[proc.pid] = proc
        self.state.daemons[node] = proc.pid
        self.save()
        return proc.pid

    def wait_daemon(self, node: str, timeout: float = 30.0) -> None:
        from meshnet.daemon.api import health_check

        deadline = time.monotonic() + timeout
        pid = self.state.daemons[node]
        while time.monotonic() < deadline:
            if not _alive(pid):
                tail = (self.dir / f"{node}.log").read_text(errors="replace")[-2000:]
                raise LabError(f"meshnetd on {node} exited:\n{tail}")
            try:
                if health_check(str(self.socket(node)), timeout=1.0).get("ready"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise LabError(f"meshnetd on {node} did not become ready in {timeout:.0f}s (log: {self.dir / node}.log)")

    def stop_daemon(self, node: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        pid = self.state.daemons.pop(node, 0)
        self.save()
        child = self._children.pop(pid, None)
        if child is not None and child.poll() is not None:
            return
        if not pid or not _alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.02)
        if child is not None:
            child.wait()

    # --- pods (the kubelet's part) -------------------------------------------------------------------

    def cni_config(self, node: str) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": f"meshnet-{self.name}",
            "type": "meshnet",
            "daemon_socket": str(self.socket(node)),
            "log_file": str(self.dir / "cni.log"),
            "delegate": {
                "cniVersion": "1.0.0",
                "name": f"{self.name}-eth0",
                "plugins": [{
                    "type": "bridge", "bridge": "mnl0", "isGateway": True, "ipMasq": False,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                             "dataDir": str(self.dir / "ipam" / node)},
                }],
            },
        }

    def cni(self, command: str, rec: PodRecord) -> tuple[int, dict[str, Any]]:
        """Run the CNI binary exactly as a kubelet's runtime does: env + config on stdin."""
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": rec.container_id,
            "CNI_NETNS": str(NETNS_DIR / rec.netns),
            "CNI_IFNAME": "eth0",
            "CNI_PATH": ":".join(CNI_PLUGIN_DIRS),
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={rec.namespace};K8S_POD_NAME={rec.name};"
                        f"K8S_POD_INFRA_CONTAINER_ID={rec.container_id}",
            "PATH": self.state.cni_env_path or os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        proc = subprocess.run(self.state.cni_bin, input=json.dumps(self.cni_config(rec.node)).encode(),
                              env=env, capture_output=True, timeout=600, check=False)
        try:
            answer = json.loads(proc.stdout or b"{}")
        except ValueError:
            answer = {"code": 999, "msg": "CNI plugin printed no JSON", "details": proc.stdout[-500:].decode()}
        return proc.returncode, answer

    def add_pod(self, pod: str) -> PodRecord:
        rec = self.state.pods[pod]
        started = time.monotonic()
        if not (NETNS_DIR / rec.netns).exists():
            self.executor.run_sequence([Command(None, ("netns", "add", rec.netns)),
                                        Command(rec.netns, ("link", "set", "lo", "up"))])
        rec.container_id = secrets.token_hex(32)
        rc, answer = self.cni("ADD", rec)
        rec.seconds = round(time.monotonic() - started, 3)
        if rc == 0:
            rec.state, rec.error = "up", ""
            rec.links = sum(1 for i in answer.get("interfaces", []) if i.get("sandbox") and i.get("name") != "eth0")
        else:
            rec.state = "failed"
            rec.error = f"CNI error {answer.get('code')}: {answer.get('msg')}" + (
                f": {answer['details']}" if answer.get("details") else "")
        return rec

    def add_pods(self, pods: list[str], workers: int = 8) -> None:
        done = 0

        def one(pod: str) -> PodRecord:
            return self.add_pod(pod)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pods) or 1))) as pool:
            for rec in pool.map(one, pods):
                done += 1
                mark = "ok" if rec.state == "up" else "FAILED"
                # Links whose peers were up at its ADD; the others are built by the peers' ADDs.
                extra = f"{rec.links} link(s) in its ADD result" if rec.state == "up" else rec.error
                self._progress(f"[{done}/{len(pods)}] {rec.name} on {rec.node}: {mark} ({extra}, {rec.seconds:.2f}s)")
                self.save()

    def del_pod(self, pod: str, *, remove_netns: bool = True) -> PodRecord:
        rec = self.state.pods[pod]
        if rec.container_id:
            rc, answer = self.cni("DEL", rec)
            if rc != 0:
                raise LabError(f"CNI DEL of {pod} failed: {answer.get('msg')}: {answer.get('details', '')}")
        if remove_netns:
            self.executor.remove([Command(None, ("netns", "del", rec.netns))])
        rec.state, rec.container_id, rec.links = "down", "", 0
        self.save()
        return rec

    def restart_pod(self, pod: str, node: str = "") -> PodRecord:
        """What a pod restart does to the network: DEL, a new sandbox (new netns), ADD — on `node`
        when given (a pod rescheduled elsewhere)."""
        if node and node not in self.state.nodes:
            raise LabError(f"no node {node!r} in lab {self.name} (nodes: {', '.join(self.state.nodes)})")
        self.del_pod(pod)
        if node:
            self.state.pods[pod].node = node
        rec = self.add_pod(pod)
        self.save()
        return rec

    def restart_daemon(self, node: str) -> None:
        """kill -9 and start again: the daemon must converge from the store and the kernel."""
        self.stop_daemon(node, signal.SIGKILL)
        self.start_daemon(node)
        self.wait_daemon(node)

    # --- looking at it -------------------------------------------------------------------------------

    def kernel_links(self, netns: str) -> dict[str, dict[str, Any]]:
        try:
            return {e["ifname"]: e for e in self.executor.show(netns)}  # details and addresses in one call
        except ExecError:
            return {}

    def status(self) -> dict[str, Any]:
        st = self.state
        manifest = self.manifest()
        view = {rec.name: self.kernel_links(rec.netns) for rec in st.pods.values() if rec.state == "up"}
        recorded = self._recorded_status()
        links: list[dict[str, Any]] = []
        seen: set[tuple[str, int]] = set()
        for t in manifest.topologies:
            for lnk in t.links:
                if (t.namespace, lnk.uid) in seen:
                    continue
                seen.add((t.namespace, lnk.uid))
                a = view.get(t.name, {}).get(lnk.local_intf)
                b = None if lnk.is_macvlan else view.get(lnk.peer_pod, {}).get(lnk.peer_intf)
                kind = _kind(a) or _kind(b) or ("macvlan" if lnk.is_macvlan else "")
                if t.name not in st.pods or (not lnk.is_macvlan and lnk.peer_pod not in st.pods):
                    state = "no-pod"
                elif a is not None and (lnk.is_macvlan or b is not None):
                    state = "up" if _oper_up(a) and (b is None or _oper_up(b)) else "down"
                else:
                    state = "missing"
                # What each end's daemon recorded in its pod's Topology status (the store's view).
                ends = [t.name] if lnk.is_macvlan else [t.name, lnk.peer_pod]
                said = {pod: recorded[(t.namespace, pod)][1][lnk.uid] for pod in ends
                        if lnk.uid in recorded.get((t.namespace, pod), ("", {}))[1]}
                links.append({"uid": lnk.uid, "namespace": t.namespace, "a": f"{t.name}:{lnk.local_intf}",
                              "b": "host:" + lnk.peer_intf if lnk.is_macvlan else f"{lnk.peer_pod}:{lnk.peer_intf}",
                              "kind": kind, "state": state, "status": said})
        nodes = [{"name": n, "netns": self.node_netns(i), "vtep": str(UNDERLAY[i + 1]),
                  "daemon_pid": st.daemons.get(n, 0), "daemon": "running" if _alive(st.daemons.get(n, 0)) else "down"}
                 for i, n in enumerate(st.nodes)]
        pods = [{**asdict(r), "plumbing_error": recorded.get((r.namespace, r.name), ("", {}))[0]}
                for r in st.pods.values()]
        return {"lab": self.name, "manifest": st.manifest, "store": st.store_url.split("?")[0],
                "nodes": nodes, "pods": pods, "links": links}

    def _recorded_status(self) -> dict[tuple[str, str], tuple[str, dict[int, str]]]:
        """{(namespace, pod): (plumbing_error, {uid: "state" or "state: message"})} from the store."""
        from meshnet.store import open_store

        store = open_store(self.state.store_url)
        try:
            topologies = store.list(None)
        finally:
            store.close()
        return {t.key: (t.status.plumbing_error,
                        {s.uid: f"{s.state}: {s.message}" if s.message else s.state for s in t.status.links})
                for t in topologies}

    def summary(self, seconds: float) -> dict[str, Any]:
        status = self.status()
        kinds: dict[str, int] = {}
        for lnk in status["links"]:
            if lnk["state"] == "up":
                kinds[lnk["kind"]] = kinds.get(lnk["kind"], 0) + 1
        per_node: dict[str, int] = {}
        for rec in self.state.pods.values():
            per_node[rec.node] = per_node.get(rec.node, 0) + 1
        failed = {r.name: r.error for r in self.state.pods.values() if r.state == "failed"}
        return {"lab": self.name, "seconds": round(seconds, 2), "pods_per_node": per_node,
                "links_up_by_kind": kinds, "links_total": len(status["links"]), "failed": failed}

    def connectivity(self, attempts: int = 3) -> list[dict[str, Any]]:
        """Ping each addressed link end from its peer (macvlan ends from the external namespace)."""
        st = self.state
        checks: list[tuple[str, str, str, str]] = []  # (from netns, from label, address, to label)
        for t in self.manifest().topologies:
            rec = st.pods.get(t.name)
            if rec is None or rec.state != "up":
                continue
            for lnk in t.links:
                if lnk.local_ip is None:
                    continue
                to = f"{t.name}:{lnk.local_intf}"
                if lnk.is_macvlan:
                    checks.append((self.external_netns, "external", str(lnk.local_ip.ip), to))
                    continue
                peer = st.pods.get(lnk.peer_pod)
                if peer is not None and peer.state == "up":
                    checks.append((peer.netns, f"{peer.name}:{lnk.peer_intf}", str(lnk.local_ip.ip), to))

        def ping(check: tuple[str, str, str, str]) -> dict[str, Any]:
            ns, frm, addr, to = check
            six = isinstance(ipaddress.ip_address(addr), ipaddress.IPv6Address)
            ok = False
            for _ in range(attempts):
                proc = subprocess.run(["ip", "netns", "exec", ns, "ping", *(["-6"] if six else []), "-c1", "-W1",
                                       addr], capture_output=True, check=False)
                if proc.returncode == 0:
                    ok = True
                    break
            return {"from": frm, "to": to, "address": addr, "ok": ok}

        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(ping, checks))

    # --- tear-down -----------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """DEL every pod like a kubelet, stop the daemons, remove every namespace and file."""
        problems: list[str] = []
        if self.exists():
            st = self.state
            up = [r.name for r in st.pods.values() if r.container_id]
            with ThreadPoolExecutor(max_workers=8) as pool:
                for pod, err in zip(up, pool.map(self._del_quietly, up), strict=True):
                    if err:
                        problems.append(f"{pod}: {err}")
            for node in list(st.daemons):
                self.stop_daemon(node)
        leftovers = sorted(p.name for p in NETNS_DIR.glob(f"{self.prefix}*")) if NETNS_DIR.exists() else []
        if leftovers:
            self.executor.remove([Command(None, ("netns", "del", n)) for n in leftovers])
        shutil.rmtree(self.dir, ignore_errors=True)
        self._state = None
        return problems

    def _del_quietly(self, pod: str) -> str:
        try:
            self.del_pod(pod, remove_netns=False)
        except (LabError, ExecError, OSError, subprocess.SubprocessError) as e:
            return str(e)
        return ""


def _kind(entry: dict[str, Any] | None) -> str:
    return str((entry or {}).get("linkinfo", {}).get("info_kind", ""))


def _oper_up(entry: dict[str, Any]) -> bool:
    return "UP" in entry.get("flags", []) and "LOWER_UP" in entry.get("flags", [])


def _alive(pid: int) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (the lab CLI started it) is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def loopback_api_port(kubeconfig: str) -> int | None:
    """The port of the kubeconfig's API server if it listens on loopback, else None."""
    import yaml

    path = Path(kubeconfig or os.environ.get("KUBECONFIG", "") or Path.home() / ".kube" / "config")
    try:
        conf = yaml.safe_load(path.read_text()) or {}
        context = next(c["context"] for c in conf["contexts"] if c["name"] == conf["current-context"])
        server = next(c["cluster"]["server"] for c in conf["clusters"] if c["name"] == context["cluster"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration):
        return None  # no usable kubeconfig: the store reports that itself
    url = urlsplit(server)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    return url.port or (443 if url.scheme == "https" else 80)


def list_labs(root: Path = LAB_ROOT) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/state.json")) if root.exists() else []


def manifest_or_error(path: str) -> Manifest:
    try:
        return load_manifest(path)
    except ManifestError as e:
        raise LabError(str(e)) from e

