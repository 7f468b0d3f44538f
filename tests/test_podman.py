"""meshnet under podman: real containers, a real CNI client (libcni in podman), no Kubernetes.

Nothing of ours plays the runtime here: podman runs busybox containers from a local root
filesystem and calls the network's conflist (`bridge` + `host-local` for eth0, meshnet chained
after it) itself, on `run`, `restart`, `stop`, `start` and `rm`. meshnetd runs with
`--single-node` and a private sqlite store; `meshnetctl topology apply` loads the Topologies.

podman (with everything it spawns: conmon, runc, the CNI plugins, conmon's `podman container
cleanup`) and meshnetd run inside a network namespace of the test, `mnt-pod<hex>`, entered with
`nsenter --net` only: the bridge plugin creates the bridge `mnpodtest0` with 198.51.100.1/24 (and
its route) where podman runs, and that must never be the machine's own namespace (this machine
reaches its package mirror through a documentation range). The mount namespace stays the host's,
so the `netns-*` namespaces podman bind-mounts under /run/netns are visible to meshnetd and to
the test. meshnetd's gRPC port binds to 127.0.0.1 of that namespace (`--single-node`), so its
loopback is brought up.

Everything podman-side is private to the test: storage (`--root`/`--runroot`), containers.conf
(via CONTAINERS_CONF: runtime, cgroup manager, ulimits, network backend, plugin and network
config directories), the network config directory and host-local's data. What lands on the host
is the namespace `mnt-pod<hex>`, podman's `netns-*` namespaces while containers run, and libcni's
cache entries under /var/lib/cni/results (removed by podman on DEL). The module's last test tears
it all down and checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from meshnet import cli, naming
from meshnet.daemon.config import parse_args
from meshnet.model import load_manifest
from meshnet.standalone import (
    StandaloneError,
    apply_topologies,
    delete_topologies,
    podman_network,
    write_podman_network,
)
from meshnet.store import open_store
from tests.labkit import host_network_trespass

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("podman", "runc", "busybox-static")
NETWORK = "mnt-podman"
TMP_PREFIX = "mnpod-"
NETNS_PREFIX = "mnt-pod"  # the private network namespace podman and meshnetd run in
NETNS_DIR = Path("/run/netns")
BRIDGE = "mnpodtest0"
SUBNET = "198.51.100.0/24"  # not 203.0.113.0/24: this machine reaches its package mirror there
CNI_CACHE = Path("/var/lib/cni/results")
# This sandbox lacks CAP_SYS_RESOURCE: runc cannot raise rlimits above the hard limits it has, so
# the containers get lower ones. crun fails on this machine's cgroups; runc with cgroupfs works.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{tmp}/podman-tmp"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{tmp}/cni-bin", "/usr/lib/cni"]
network_config_dir = "{tmp}/net.d"
default_network = "{network}"
"""


def _run(argv: list[str], *, env: dict[str, str] | None = None,
         timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _ensure_packages() -> None:
    missing = [p for p in PACKAGES if _run(["dpkg", "-s", p]).returncode != 0]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if _run(argv, env=env, timeout=600).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env, timeout=600)
        proc = _run(argv, env=env, timeout=600)
        assert proc.returncode == 0, f"apt-get install {' '.join(missing)} failed:\n{proc.stderr[-2000:]}"


def _host_links() -> set[str]:
    out = _run(["ip", "-j", "link", "show"]).stdout
    return {e["ifname"] for e in json.loads(out or "[]")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def _start_time(pid: int) -> str:
    """A process's start time (clock ticks since boot): with the pid, it names one process for good."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _ip_json(*args: str) -> list[dict[str, Any]]:
    proc = _run(["ip", "-j", *args])
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr.strip()}"
    return list(json.loads(proc.stdout or "[]"))


class PodmanLab:
    """A private podman setup plus one meshnetd, both in a network namespace of their own;
    `close()` removes all of it."""

    def __init__(self, tmp: Path | None = None) -> None:
        self.tmp = tmp or Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        # Recorded in the directory so that a later run can clean up after a killed one.
        recorded = self.tmp / "netns"
        self.netns = recorded.read_text().strip() if recorded.exists() else ""
        if not self.netns.startswith(NETNS_PREFIX) or "/" in self.netns:  # ours, or nothing to touch
            self.netns = ""
        if tmp is None:  # ours: a concurrent module's stale-run clean-up must leave it alone
            (self.tmp / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}")
        self.store_url = f"sqlite://{self.tmp / 'store.db'}"
        self.socket = str(self.tmp / "meshnetd.sock")
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.tmp / "containers.conf")}
        self.daemon: subprocess.Popen[bytes] | None = None
        self.netns_seen: set[str] = set()
        self.container_ids: set[str] = set()
        self.baseline_links = _host_links()
        self.closed = False

    @property
    def in_netns(self) -> list[str]:
        """The argv prefix that runs a command in the private namespace. Only the network
        namespace: podman's /run/netns bind mounts must stay visible to meshnetd and the test."""
        assert self.netns, "no private network namespace"
        return ["nsenter", f"--net={NETNS_DIR / self.netns}"]

    def netns_up(self) -> None:
        """Create the private namespace (idempotent) with its loopback up."""
        if not self.netns:
            self.netns = f"{NETNS_PREFIX}{secrets.token_hex(3)}"
            (self.tmp / "netns").write_text(self.netns)
        if not (NETNS_DIR / self.netns).exists():
            proc = _run(["ip", "netns", "add", self.netns])
            assert proc.returncode == 0, f"ip netns add {self.netns}: {proc.stderr.strip()}"
        proc = _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        assert proc.returncode == 0, f"{self.netns}: lo up: {proc.stderr.strip()}"

    def setup(self) -> None:
        if BRIDGE in self.baseline_links:  # left on the host by a run before the private namespace
            _run(["ip", "link", "del", BRIDGE])
            self.baseline_links.discard(BRIDGE)
        self.netns_up()
        proc = _run([sys.executable, str(ROOT / "scripts" / "podman-rootfs"), str(self.tmp / "rootfs")])
        assert proc.returncode == 0, proc.stderr
        (self.tmp / "containers.conf").write_text(CONTAINERS_CONF.format(tmp=self.tmp, network=NETWORK))
        plugin = self.tmp / "cni-bin" / "meshnet"
        plugin.parent.mkdir()
        # The shim as podman finds it in cni_plugin_dirs: this venv's Python running meshnet.cni.shim.
        plugin.write_text(f'#!/bin/sh\nexec {sys.executable} -m meshnet.cni.shim "$@"\n')
        plugin.chmod(0o755)
        write_podman_network(self.tmp / "net.d", podman_network(
            NETWORK, bridge=BRIDGE, subnet=SUBNET, socket=self.socket, ipam_dir=str(self.tmp / "ipam"),
            log_file=str(self.tmp / "cni.log")))
        self.start_daemon()

    def start_daemon(self) -> None:
        from meshnet.daemon.api import health_check

        log = open(self.tmp / "meshnetd.log", "ab")  # noqa: SIM115 - handed to the child
        self.daemon = subprocess.Popen(  # nsenter execs: the pid is meshnetd's
            [*self.in_netns, sys.executable, "-m", "meshnet.daemon.main", "--single-node", "--node-name", "podman-host",
             "--store", self.store_url, "--socket", self.socket, "--grpc-port", str(_free_port()),
             "--journal", str(self.tmp / "journal"), "--resync", "5"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        (self.tmp / "meshnetd.pid").write_text(str(self.daemon.pid))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.daemon.poll() is None, f"meshnetd exited:\n{self.daemon_log()}"
            try:
                if health_check(self.socket, timeout=1.0).get("ready"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"meshnetd not ready in 30s:\n{self.daemon_log()}")

    def daemon_log(self) -> str:
        path = self.tmp / "meshnetd.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def cni_log(self) -> str:
        path = self.tmp / "cni.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["podman", "--root", str(self.tmp / "storage"), "--runroot", str(self.tmp / "run"), *args]
        proc = _run([*self.in_netns, *argv], env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                                 f"meshnetd log:\n{self.daemon_log()}\nCNI log:\n{self.cni_log()}")
        return proc

    def run(self, name: str) -> str:
        proc = self.podman("run", "-d", "--name", name, "--hostname", name, "--network", NETWORK,
                           "--rootfs", f"{self.tmp / 'rootfs'}:O", "sleep", "100000")
        self.container_ids.add(proc.stdout.strip())
        return self.sandbox(name)

    def sandbox(self, name: str) -> str:
        path = self.podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", name).stdout.strip()
        assert path.startswith("/run/netns/"), f"{name}: unexpected netns {path!r}"
        self.netns_seen.add(path)
        return path

    def links(self, name: str) -> dict[str, list[str]]:
        """{ifname: [addresses]} inside the container, read with its own busybox `ip`."""
        out = self.podman("exec", name, "ip", "-o", "addr", "show").stdout
        links: dict[str, list[str]] = {}
        for line in out.splitlines():
            fields = line.split()
            ifname = fields[1].split("@")[0].rstrip(":")
            links.setdefault(ifname, [])
            if fields[2] == "inet":
                links[ifname].append(fields[3])
        return links

    def assert_private_network(self) -> None:
        """The bridge and its address are in the private namespace; nothing of ours on the host."""
        assert host_network_trespass() == [], "the host network namespace carries something of ours"
        assert BRIDGE not in _host_links()
        bridge = _ip_json("-n", self.netns, "addr", "show", "dev", BRIDGE)
        addrs = [a.get("local") for e in bridge for a in e.get("addr_info", [])]
        assert "198.51.100.1" in addrs, f"{BRIDGE} in {self.netns}: {addrs}"

    def ping(self, src: str, address: str) -> bool:
        for _ in range(3):
            if self.podman("exec", src, "ping", "-c1", "-W1", address, check=False).returncode == 0:
                return True
        return False

    def remove(self, *names: str) -> None:
        for name in names:  # one at a time: podman rm stops at the first name it does not know
            self.podman("rm", "-f", "-t", "0", "--ignore", name)

    def close(self) -> list[str]:
        """Remove everything (idempotent); returns what could not be removed."""
        if self.closed:
            return []
        self.closed = True
        problems = []
        if (self.tmp / "storage").exists():
            self.netns_up()  # a killed run's namespace may be gone; podman's DELs must not run on the host
            names = self.podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
            for name in names:
                proc = self.podman("rm", "-f", "-t", "0", name, check=False)
                if proc.returncode != 0:
                    problems.append(f"podman rm {name}: {proc.stderr.strip()}")
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        elif self.daemon is None:
            self._stop_stale_daemon()
        if self.netns and (NETNS_DIR / self.netns).exists():  # takes the bridge and its veths with it
            proc = _run(["ip", "netns", "del", self.netns])
            if proc.returncode != 0:
                problems.append(f"ip netns del {self.netns}: {proc.stderr.strip()}")
        for path in self.netns_seen:
            if Path(path).exists():
                problems.append(f"{path} was left; removing it")
                _run(["ip", "netns", "del", Path(path).name])
        # Storage mounts (overlay, shm) are gone after `rm`; never delete through one still there.
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4].startswith(str(self.tmp))]
        for m in sorted(mounts, reverse=True):
            problems.append(f"mount {m} was left; unmounting it")
            _run(["umount", "-l", m])
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems

    def owner_alive(self) -> bool:
        """Whether the test process that made this run still runs (it cleans up after itself)."""
        try:
            pid, start = (self.tmp / "owner").read_text().split()
            return pid != str(os.getpid()) and _start_time(int(pid)) == start != ""
        except (OSError, ValueError):
            return False

    def daemon_pid(self) -> int | None:
        """The recorded meshnetd's pid if that process still runs and is still it (not a zombie)."""
        try:
            pid = int((self.tmp / "meshnetd.pid").read_text())
            if str(self.tmp) not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                return None
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] == "Z":
                return None
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def _stop_stale_daemon(self) -> None:
        """The meshnetd of an earlier, killed run: by its recorded pid, if that is still it."""
        pid = self.daemon_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _clean_stale_runs() -> None:
    """Containers, daemon, namespace and files of runs that were killed before their clean-up.
    A run whose test process still runs is another engineer's module in progress: left alone (its
    bridge is in its own namespace, its storage, IPAM and socket in its own directory)."""
    for tmp in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        if not tmp.is_dir():
            continue
        run = PodmanLab(tmp)
        if not run.owner_alive():
            run.close()


# --- without podman: the conflist, the topology commands, the daemon flag ----------------------------

def test_podman_network_conflist() -> None:
    conf = podman_network("meshnet", socket="/run/x.sock", ipam_dir="/var/lib/x", log_file="/tmp/c.log")
    assert conf["cniVersion"] == "1.0.0" and conf["name"] == "meshnet"
    bridge, meshnet = conf["plugins"]
    assert bridge["type"] == "bridge" and bridge["bridge"] == "mnpod0"
    assert bridge["ipMasq"] is False  # nothing NATed out of the host's real interfaces
    assert bridge["ipam"] == {"type": "host-local", "ranges": [[{"subnet": "203.0.113.0/24"}]],
                              "dataDir": "/var/lib/x"}
    assert meshnet == {"type": "meshnet", "daemon_socket": "/run/x.sock", "log_file": "/tmp/c.log"}
    assert "dataDir" not in podman_network()["plugins"][0]["ipam"]


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"name": "a b"}, "network name"),
    ({"bridge": "a-very-long-bridge-name"}, "bridge"),
    ({"subnet": "203.0.113.0/33"}, "subnet"),
    ({"socket": "relative.sock"}, "absolute"),
])
def test_podman_network_rejects(kwargs: dict[str, str], problem: str) -> None:
    with pytest.raises(StandaloneError, match=problem):
        podman_network(**kwargs)


def test_podman_network_command_writes_conflist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["podman-network", "--conf-dir", str(tmp_path), "--name", "lab1", "--socket", "/s.sock"]) == 0
    written = tmp_path / "lab1.conflist"
    assert capsys.readouterr().out.strip() == str(written)
    assert json.loads(written.read_text()) == podman_network("lab1", socket="/s.sock")
    assert cli.main(["podman-network", "--subnet", "nonsense", "--print"]) == 1


def test_topology_apply_and_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite://{tmp_path / 'sub' / 'store.db'}"  # the directory is created on the way
    manifest = ROOT / "tests" / "3node.yml"
    assert cli.main(["topology", "apply", str(manifest), "--store", url]) == 0
    assert "topology default/r1 applied (2 links)" in capsys.readouterr().out
    store = open_store(url)
    try:
        assert [t.name for t in store.list("default")] == ["r1", "r2", "r3"]
        stored, wanted = store.get("default", "r2"), load_manifest(manifest).topology("default", "r2")
        assert stored is not None and wanted is not None and stored.links == wanted.links
    finally:
        store.close()
    applied = apply_topologies(manifest, url)  # again: replaces, does not duplicate
    assert len(applied) == 3
    assert [existed for _, existed in delete_topologies(manifest, url)] == [True, True, True]
    assert cli.main(["topology", "delete", str(manifest), "--store", url]) == 0
    assert "topology default/r3 not found" in capsys.readouterr().out


def test_topology_apply_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("apiVersion: networkop.co.uk/v1beta1\nkind: Topology\nmetadata: {name: r1}\n"
                   "spec: {links: [{uid: 1, peer_pod: r2, local_intf: eth1}]}\n")
    assert cli.main(["topology", "apply", str(bad), "--store", f"sqlite://{tmp_path / 's.db'}"]) == 1
    assert "peer_intf" in capsys.readouterr().err
    assert cli.main(["topology", "apply", str(ROOT / "tests" / "3node.yml"), "--store", "nosuch:x"]) == 1
    assert "unknown store" in capsys.readouterr().err


def test_daemon_single_node_flag() -> None:
    cfg = parse_args(["--single-node", "--store", "sqlite:///x.db"], env={})
    # The bind is left to the daemon: its VTEP, which --single-node makes 127.0.0.1 (no peers:
    # not reachable from outside); every address is refused without TLS (tests/test_daemon_config.py).
    assert cfg.single_node and cfg.grpc_bind == ""
    plain = parse_args([], env={})
    assert not plain.single_node and plain.grpc_bind == ""


@pytest.fixture(scope="module")
def lab() -> Iterator[PodmanLab]:
    _ensure_packages()
    _clean_stale_runs()
    lab = PodmanLab()
    try:
        lab.setup()
        yield lab
    finally:
        lab.close()


def addressed_ends(manifest_path: Path) -> list[tuple[str, str, str]]:
    """(pinging container, address, its owner:interface) for every addressed link end."""
    checks = []
    for t in load_manifest(manifest_path).topologies:
        for link in t.links:
            if link.local_ip is not None and not link.is_macvlan:
                checks.append((link.peer_pod, str(link.local_ip.ip), f"{t.name}:{link.local_intf}"))
    return checks


def assert_all_ping(lab: PodmanLab, manifest_path: Path) -> int:
    checks = addressed_ends(manifest_path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: lab.ping(c[0], c[1]), checks))
    failed = [f"{src} -> {addr} ({to})" for (src, addr, to), ok in zip(checks, results, strict=True) if not ok]
    assert not failed, f"no answer: {failed}\nmeshnetd log:\n{lab.daemon_log()}"
    return len(checks)


def expected_links(manifest_path: Path) -> dict[str, dict[str, str]]:
    return {t.name: {lk.local_intf: str(lk.local_ip) for lk in t.links if lk.local_ip is not None}
            for t in load_manifest(manifest_path).topologies}


def assert_links(lab: PodmanLab, name: str, want: dict[str, str]) -> None:
    have = lab.links(name)
    for intf, addr in want.items():
        assert addr in have.get(intf, []), f"{name}: {intf} should carry {addr}; has {have}"
    assert "eth0" in have and any(a.startswith("198.51.100.") for a in have["eth0"]), have


@pytest.mark.root
@pytest.mark.slow
def test_3node_restart_stop_start(lab: PodmanLab) -> None:
    manifest = ROOT / "tests" / "3node.yml"
    want = expected_links(manifest)
    apply_topologies(manifest, lab.store_url)
    try:
        # r1 first, alone: its links wait for their peers and are built by r2's and r3's ADD.
        for name in ("r1", "r2", "r3"):
            lab.run(name)
        for name in ("r1", "r2", "r3"):
            assert_links(lab, name, want[name])
        assert assert_all_ping(lab, manifest) == 6
        lab.assert_private_network()

        # restart: podman runs DEL, then ADD in a new network namespace
        before = lab.sandbox("r1")
        lab.podman("restart", "-t", "0", "r1")
        assert lab.sandbox("r1") != before, "podman restart kept the network namespace"
        assert_links(lab, "r1", want["r1"])
        assert_all_ping(lab, manifest)

        # stop: DEL removes r1's links, and with them the peer ends in r2 and r3
        lab.podman("stop", "-t", "0", "r1")
        assert "eth1" not in lab.links("r2") and "eth1" not in lab.links("r3")
        lab.podman("start", "r1")
        assert_links(lab, "r1", want["r1"])
        assert_all_ping(lab, manifest)

        # a container that dies on its own: conmon's exit command (`podman container cleanup`) runs DEL
        lab.podman("kill", "r1")
        deadline = time.monotonic() + 10
        while "eth1" in lab.links("r2") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "eth1" not in lab.links("r2"), f"no DEL after r1 died:\n{lab.cni_log()}"
        lab.podman("start", "r1")
        assert_all_ping(lab, manifest)

        # rm -f: links go with the container; the survivors keep their own link
        lab.remove("r1")
        assert set(lab.links("r2")) == {"lo", "eth0", "eth2"}
        assert lab.ping("r3", "23.23.23.2")
        lab.remove("r2", "r3")
        assert not [p for p in lab.netns_seen if Path(p).exists()], "a container's netns outlived it"
        assert _host_links() <= lab.baseline_links
    finally:
        lab.remove("r1", "r2", "r3")
        delete_topologies(manifest, lab.store_url)


@pytest.mark.root
@pytest.mark.slow
def test_5node(lab: PodmanLab) -> None:
    manifest = ROOT / "tests" / "5node.yml"
    want = expected_links(manifest)
    apply_topologies(manifest, lab.store_url)
    names = [f"r{i}" for i in range(1, 6)]
    try:
        for name in reversed(names):
            lab.run(name)
        for name in names:
            assert_links(lab, name, want[name])
        assert assert_all_ping(lab, manifest) == 16
        lab.assert_private_network()
    finally:
        lab.remove(*names)
        delete_topologies(manifest, lab.store_url)
    assert _host_links() <= lab.baseline_links


@pytest.mark.root
@pytest.mark.slow
def test_teardown_leaves_nothing(lab: PodmanLab) -> None:
    """Last in the module: removing everything leaves no interface, namespace, process or mount."""
    tmp = str(lab.tmp)
    netns_seen = set(lab.netns_seen)
    private = NETNS_DIR / lab.netns
    assert lab.netns.startswith(NETNS_PREFIX) and private.exists()
    problems = lab.close()
    assert not problems
    assert lab.daemon is not None and lab.daemon.returncode is not None
    assert not [n for n in _host_links() if n.startswith("mnpod")]
    assert _host_links() <= lab.baseline_links
    assert not [p for p in netns_seen if Path(p).exists()]
    assert not private.exists(), "the private network namespace outlived the module"
    assert host_network_trespass() == []
    # Of this run's containers only: other engineers' labs attach namespaces of their own meanwhile.
    attached = [naming.attached_netns_name(p) for p in netns_seen]
    assert not [n for n in attached if (NETNS_DIR / n).exists()], "meshnetd left an attached netns"
    assert not _processes_mentioning(tmp), "a process of the test (meshnetd, conmon ...) is still running"
    # Only this run's containers: another engineer's module may have entries of the same network name.
    assert lab.container_ids and all(len(c) == 64 for c in lab.container_ids)
    cached = [p.name for p in CNI_CACHE.glob(f"{NETWORK}-*")]
    assert not [n for n in cached if any(c in n for c in lab.container_ids)], \
        f"podman's libcni cache kept an entry of a container of ours: {cached}"
    assert not Path(tmp).exists()
