"""containerd (its CRI plugin) as the runtime of an emulated meshnet cluster, driven like a kubelet.

    from tests.crikit import cri_cluster

    with cri_cluster(tmp_path, "tests/3node.yml", nodes=3) as cluster:   # Topologies only, no pods
        cluster.set_mode("chain")                        # or "delegate": the node's CNI config
        sb = cluster.run_pod("r1", node="node0")         # RunPodSandbox with pod metadata -> ADD
        cluster.stop_and_remove(sb)                      # StopPodSandbox (DEL), RemovePodSandbox (DEL)

A lab (`meshnet.lab.cluster.Lab`) provides the nodes (network namespaces `mnl-<lab>-node<i>`), the
underlay, the store with the manifest's Topologies and one meshnetd per node, but starts no pod:
each node gets its own containerd instead (private config, root, state and sockets; see
tests/cri/boot.py for the mount namespace), running in the node's network namespace so that the
CNI plugins it runs (meshnet's shim, `bridge`, `host-local`) run there as on a Kubernetes node.
Pods are sandboxes (a pause image built here from busybox-static); their names come from the
sandbox metadata, exactly as a kubelet passes them.

On exit, whatever happened: every sandbox is stopped and removed through CRI, containerd is
stopped, leftovers (shim processes, the sandboxes' `cni-*` namespaces, cgroups, the temp dirs) are
removed by name and reported, the lab is taken down; then the exit asserts nothing is left.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from meshnet.daemon.netns import NETNS_DIR as NETNS_DIR
from meshnet.install import render_config
from meshnet.lab.cluster import Lab
from meshnet.lab.kubelet import CNI_PLUGIN_DIRS, POD_SUBNET, default_cni_bin
from meshnet.lab.state import PodRecord
from tests.cri import api_pb2 as cri
from tests.cri import api_pb2_grpc as cri_grpc
from tests.labkit import lab_leftovers
from tests.owned import Claim

PAUSE_IMAGE = "mnt.invalid/meshnet-pause:1"  # never pulled: imported from a local archive
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
BOOT = Path(__file__).resolve().parent / "cri" / "boot.py"
CGROUP_ROOT = Path("/sys/fs/cgroup")
RPC_TIMEOUT = 120.0


class CriError(Exception):
    pass


def pause_archive(path: Path) -> Path:
    """A docker-archive image: busybox-static as /bin/busybox and /bin/sleep, ENTRYPOINT sleep infinity."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX.resolve()), arcname="bin/busybox")
        for tool in ("sleep", "sh"):
            info = tarfile.TarInfo(f"bin/{tool}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    blob = layer.getvalue()
    config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {"Entrypoint": ["/bin/sleep", "infinity"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(blob).hexdigest()}"]},
    }
    raw_config = json.dumps(config).encode()
    manifest = [{"Config": "config.json", "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]
    with tarfile.open(path, "w") as tar:
        for name, data in (("layer.tar", blob), ("config.json", raw_config),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@dataclass
class Sandbox:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    node: str
    netns: str = ""  # e.g. "cni-<uuid>", from PodSandboxStatus(verbose)

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


@dataclass
class NodeRuntime:
    """One containerd in one node's network namespace."""

    node: str
    netns: str
    dir: Path
    cgroup_parent: str
    proc: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    stub: cri_grpc.RuntimeServiceStub | None = None
    sandboxes: dict[str, Sandbox] = field(default_factory=dict)  # every id ever run, until removed

    @property
    def address(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def conf_dir(self) -> Path:
        return self.dir / "net.d"

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    @property
    def ipam_dir(self) -> Path:
        return self.dir / "ipam"

    @property
    def cni_lib(self) -> Path:
        return self.dir / "var-lib-cni"

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    def config_toml(self) -> str:
        d = self.dir
        cri_plugin = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{d / 'containerd.sock.ttrpc'}"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[{cri_plugin}]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
[{cri_plugin}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri_plugin}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri_plugin}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri_plugin}.cni]
  bin_dir = "{self.bin_dir}"
  conf_dir = "{self.conf_dir}"
"""

    def rpc(self) -> cri_grpc.RuntimeServiceStub:
        if self.stub is None:
            raise CriError(f"containerd on {self.node} is not running")
        return self.stub


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains `marker` (a directory of ours: unique)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and _alive(int(proc.name)):
            found.append(int(proc.name))
    return sorted(found)


class CriCluster:
    def __init__(self, lab: Lab, root: Path, claim: Claim) -> None:
        self.lab = lab
        self.root = root
        self.claim = claim  # told each cgroup and sandbox namespace before they exist
        self.token = secrets.token_hex(3)
        self.cgroup_parent = f"/mnt-cri-{self.token}"
        claim.add_cgroup(self.cgroup_parent)
        self.runtimes = {node: NodeRuntime(node, lab.node_netns(i), root / f"cri-{node}", self.cgroup_parent)
                         for i, node in enumerate(lab.state.nodes)}
        self.mode = ""
        self.archive = pause_archive(root / "pause.tar")
        self.seen_netns: set[str] = set()  # every cni-* namespace a sandbox of ours had

    # --- containerd ------------------------------------------------------------------------------

    def start(self, node: str) -> None:
        rt = self.runtimes[node]
        for d in (rt.dir, rt.conf_dir, rt.bin_dir, rt.ipam_dir, rt.cni_lib, rt.dir / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        for plugin in ("bridge", "host-local", "loopback"):  # containerd brings up `lo` with CNI's loopback
            target = next(Path(d) / plugin for d in CNI_PLUGIN_DIRS if (Path(d) / plugin).exists())
            (rt.bin_dir / plugin).unlink(missing_ok=True)
            (rt.bin_dir / plugin).symlink_to(target)
        shim = rt.bin_dir / "meshnet"  # the shim as the lab runs it: stdlib only, no venv
        shim.write_text(f"#!/bin/sh\nexec {shlex.join(default_cni_bin())}\n")
        shim.chmod(0o755)
        conf = rt.dir / "config.toml"
        conf.write_text(rt.config_toml())
        argv = ["nsenter", f"--net={NETNS_DIR / rt.netns}", "unshare", "--mount", "--propagation", "unchanged",
                sys.executable, "-S", "-E", str(BOOT), "--run-dir", str(rt.dir), "--cni-lib", str(rt.cni_lib),
                "--", "containerd", "--config", str(conf)]
        log = open(rt.log, "ab")  # noqa: SIM115 - handed to the child process
        rt.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while not rt.address.exists():
            if rt.proc.poll() is not None or time.monotonic() > deadline:
                raise CriError(f"containerd on {node} did not start:\n{rt.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        rt.channel = grpc.insecure_channel(f"unix://{rt.address}")
        rt.stub = cri_grpc.RuntimeServiceStub(rt.channel)
        while True:
            try:
                rt.stub.Version(cri.VersionRequest(version="v1"), timeout=5)
                break
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise CriError(f"containerd on {node}: CRI not serving: {e}") from e
                time.sleep(0.1)
        subprocess.run(["ctr", "--address", str(rt.address), "-n", "k8s.io", "images", "import",
                        str(self.archive)], check=True, capture_output=True, timeout=120)

    def stop_runtime(self, node: str) -> None:
        rt = self.runtimes[node]
        if rt.channel is not None:
            rt.channel.close()
        rt.channel = rt.stub = None
        if rt.proc is not None and rt.proc.poll() is None:
            rt.proc.send_signal(signal.SIGTERM)
            try:
                rt.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                rt.proc.kill()
                rt.proc.wait()
        rt.proc = None

    # --- CNI config ------------------------------------------------------------------------------

    def eth0_network(self, node: str) -> dict[str, Any]:
        rt = self.runtimes[node]
        return {"cniVersion": "1.0.0", "name": f"{self.lab.name}-eth0", "plugins": [{
            "type": "bridge", "bridge": "mnl0", "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "dataDir": str(rt.ipam_dir)},
        }]}

    def set_mode(self, mode: str) -> None:
        """Write each node's CNI config as `meshnetctl install-cni` would (chain or delegate) and wait
        until every containerd has loaded it."""
        for node, rt in self.runtimes.items():
            conf = render_config(self.eth0_network(node), mode=mode,  # type: ignore[arg-type]
                                 socket=str(self.lab.socket(node)), log_file=str(self.lab.dir / "cni.log"))
            conf["name"] = f"{self.lab.name}-{mode}"
            # The node's index (the lab's daemon keeps it), read by the shim while meshnetd is down.
            conf["plugins"][-1]["topology_index"] = str(self.lab.topology_index(node))
            tmp = rt.conf_dir / ".00-meshnet.tmp"
            tmp.write_text(json.dumps(conf, indent=1))
            tmp.replace(rt.conf_dir / "00-meshnet.conflist")
        for node in self.runtimes:
            self.wait_network(node, f"{self.lab.name}-{mode}")
        self.mode = mode

    def wait_network(self, node: str, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        loaded = ""
        while time.monotonic() < deadline:
            info = self.runtimes[node].rpc().Status(cri.StatusRequest(verbose=True), timeout=10).info
            loaded = info.get("cniconfig", "")
            if f'"Name":"{name}"' in loaded.replace(" ", ""):
                return
            time.sleep(0.1)
        raise CriError(f"containerd on {node} did not load network {name!r}: {loaded[:500]}")

    # --- sandboxes (the kubelet's part) ------------------------------------------------------------

    def run_pod(self, name: str, node: str, namespace: str = "default", uid: str = "",
                attempt: int = 0) -> Sandbox:
        rt = self.runtimes[node]
        uid = uid or secrets.token_hex(16)
        meta = cri.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt)
        labels = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                  "io.kubernetes.pod.uid": uid}
        config = cri.PodSandboxConfig(
            metadata=meta, hostname=name, log_directory=str(rt.dir / "logs" / f"{namespace}_{name}_{uid}"),
            labels=labels,
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup_parent,
                security_context=cri.LinuxSandboxSecurityContext(namespace_options=cri.NamespaceOption(
                    network=cri.POD, pid=cri.CONTAINER, ipc=cri.POD))))
        resp = rt.rpc().RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=RPC_TIMEOUT)
        sb = Sandbox(resp.pod_sandbox_id, name, namespace, uid, attempt, node)
        rt.sandboxes[sb.id] = sb
        sb.netns = self.netns_of(sb)
        self.seen_netns.add(sb.netns)
        self.claim.add_netns(sb.netns)
        return sb

    def status(self, sb: Sandbox) -> tuple[cri.PodSandboxStatus, dict[str, Any]]:
        resp = self.runtimes[sb.node].rpc().PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=sb.id, verbose=True), timeout=RPC_TIMEOUT)
        return resp.status, json.loads(resp.info.get("info", "{}"))

    def netns_of(self, sb: Sandbox) -> str:
        _status, info = self.status(sb)
        for ns in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network" and ns.get("path"):
                return Path(ns["path"]).name
        raise CriError(f"sandbox {sb.name} ({sb.id[:12]}): no network namespace in its status: {info}")

    def stop(self, sb: Sandbox) -> None:
        self.runtimes[sb.node].rpc().StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sb.id),
                                                    timeout=RPC_TIMEOUT)

    def remove(self, sb: Sandbox) -> None:
        self.runtimes[sb.node].rpc().RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sb.id),
                                                      timeout=RPC_TIMEOUT)
        self.runtimes[sb.node].sandboxes.pop(sb.id, None)

    def stop_and_remove(self, sb: Sandbox) -> None:
        self.stop(sb)
        self.remove(sb)

    def list(self, node: str) -> list[cri.PodSandbox]:
        return list(self.runtimes[node].rpc().ListPodSandbox(cri.ListPodSandboxRequest(), timeout=RPC_TIMEOUT).items)

    # --- looking at it -----------------------------------------------------------------------------

    def links(self, sb: Sandbox) -> dict[str, dict[str, Any]]:
        return self.lab.kernel_links(sb.netns)

    def failed_pings(self, sandboxes: list[Sandbox]) -> list[dict[str, Any]]:
        """Lab.connectivity over these sandboxes (each end pinged from its peer, retried: a busy
        machine's shared ARP table overflows now and then)."""
        st = self.lab.state
        st.pods = {sb.name: PodRecord(sb.name, sb.namespace, sb.node, sb.netns, state="up") for sb in sandboxes}
        try:
            return [c for c in self.lab.connectivity(attempts=5) if not c["ok"]]
        finally:
            st.pods = {}

    def leases(self, node: str) -> list[str]:
        """host-local's leases on `node` (one file per address, named by the address)."""
        d = self.runtimes[node].ipam_dir
        return sorted(p.name for p in d.rglob("*") if p.is_file() and p.name[:1].isdigit()) if d.exists() else []

    # --- tear-down ---------------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Stop and remove every sandbox through CRI, stop containerd; remove by name what survived
        (reported, so the test fails): shims, `cni-*` namespaces of our sandboxes, cgroups."""
        problems: list[str] = []

        def clear(rt: NodeRuntime) -> list[str]:
            errs = []
            if rt.stub is None:
                return errs
            try:
                ids = [s.id for s in self.list(rt.node)]
            except grpc.RpcError as e:
                return [f"{rt.node}: ListPodSandbox: {e.details()}"]
            for sid in ids:
                sb = rt.sandboxes.get(sid) or Sandbox(sid, "?", "?", "", 0, rt.node)
                try:
                    self.stop_and_remove(sb)
                except grpc.RpcError as e:
                    errs.append(f"{rt.node}: sandbox {sb.name} {sid[:12]}: {e.details()}")
            return errs

        with ThreadPoolExecutor(max_workers=len(self.runtimes) or 1) as pool:
            for errs in pool.map(clear, self.runtimes.values()):
                problems.extend(errs)
        for node in self.runtimes:
            self.stop_runtime(node)
        problems.extend(self.leftovers(remove=True))
        return problems

    def leftovers(self, *, remove: bool = False) -> list[str]:
        left = []
        for rt in self.runtimes.values():
            for pid in processes_mentioning(str(rt.dir)):
                left.append(f"process {pid} of {rt.node}: {_cmdline(pid)}")
                if remove:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for ns in sorted(self.seen_netns):
            if (NETNS_DIR / ns).exists():
                left.append(f"netns {ns}")
                if remove:
                    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        for ctrl in sorted(CGROUP_ROOT.iterdir()) if CGROUP_ROOT.exists() else []:
            cg = ctrl / self.cgroup_parent.lstrip("/")
            if cg.is_dir():
                children = [c for c in cg.iterdir() if c.is_dir()]
                if children:
                    left.append(f"cgroup {cg} with {len(children)} sandbox(es)")
                if remove:
                    for c in children:
                        _rmdir(c)
                    _rmdir(cg)
        return left


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _rmdir(path: Path) -> None:
    for _ in range(50):  # a cgroup can be busy for a moment after its last process exited
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


@contextmanager
def cri_cluster(manifest: str | Path, nodes: int = 3) -> Iterator[CriCluster]:
    """A lab with the manifest's Topologies loaded and a meshnetd per node, no pods, and a containerd
    per node; always torn down, then asserts nothing of it is left."""
    root = Path(tempfile.mkdtemp(prefix="mnl", dir="/tmp"))  # short: unix socket paths are <108 bytes
    text = Path(manifest).read_text() if "\n" not in str(manifest) else str(manifest)
    docs = [d for d in text.split("\n---") if "kind: Topology" in d]
    topologies = root / "topologies.yml"
    topologies.write_text("\n---".join(docs) + "\n")
    lab = Lab(f"c{secrets.token_hex(3)[:5]}", root=root)
    claim = Claim(lab.name, lab.dir, (root,))
    cluster: CriCluster | None = None
    problems: list[str] = []
    left: list[str] = []
    try:
        lab.up(str(topologies), nodes)
        cluster = CriCluster(lab, root, claim)
        with ThreadPoolExecutor(max_workers=nodes) as pool:
            list(pool.map(cluster.start, cluster.runtimes))
        yield cluster
    finally:
        try:
            if cluster is not None:
                problems = cluster.teardown()
        finally:
            try:
                problems += lab.down()
            finally:
                left = lab_leftovers(lab) + (cluster.leftovers() if cluster is not None else [])
                shutil.rmtree(root, ignore_errors=True)
                if root.exists():
                    left.append(f"directory {root}")
                if not left:  # else the record stays: the next `make clean-netns` reaps what is left
                    claim.release()
    assert not left, f"CRI cluster {lab.name} left behind: {left}"
    assert not problems, f"CRI cluster {lab.name}: tearing down failed: {problems}"


class Pods:
    """The sandboxes one test runs; `cleanup` stops and removes the rest as a kubelet would."""

    def __init__(self, cluster: CriCluster) -> None:
        self.cluster = cluster
        self.all: list[Sandbox] = []

    def run(self, name: str, node: str, namespace: str = "default", uid: str = "", attempt: int = 0) -> Sandbox:
        sb = self.cluster.run_pod(name, node, namespace=namespace, uid=uid, attempt=attempt)
        self.all.append(sb)
        return sb

    def remove(self, sb: Sandbox) -> None:
        self.cluster.stop_and_remove(sb)
        self.all.remove(sb)

    def cleanup(self) -> None:
        """Stop and remove what the test ran, then, as a kubelet's garbage collection does, any
        other sandbox containerd still lists (e.g. one whose failed ADD it could not clean up)."""
        for sb in list(self.all):
            self.remove(sb)
        for node in self.cluster.runtimes:
            for item in self.cluster.list(node):
                meta = item.metadata
                self.cluster.stop_and_remove(Sandbox(item.id, meta.name, meta.namespace, meta.uid, meta.attempt, node))


@contextmanager
def tracked_pods(cluster: CriCluster) -> Iterator[Pods]:
    """A test's sandboxes, stopped and removed afterwards; then no sandbox, lease or namespace is left."""
    p = Pods(cluster)
    try:
        yield p
    finally:
        p.cleanup()
    for node in cluster.runtimes:
        assert cluster.list(node) == [], f"{node}: sandboxes left"
        assert cluster.leases(node) == [], f"{node}: host-local leases left"
    left = sorted(ns for ns in cluster.seen_netns if (NETNS_DIR / ns).exists())
    assert left == [], f"sandbox namespaces left: {left}"


def addresses(cluster: CriCluster, sb: Sandbox) -> dict[str, str]:
    """{interface: first IPv4 address} inside the sandbox."""
    out = {}
    for name, entry in cluster.links(sb).items():
        v4 = [a["local"] for a in entry.get("addr_info", []) if a.get("family") == "inet"]
        out[name] = v4[0] if v4 else ""
    return out
