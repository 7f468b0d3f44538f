"""The emulated kubelet: a pod's sandbox is a network namespace, and its network is set up the way a
container runtime does it — the real `meshnet` CNI binary run with CNI_* in its environment and the
network config on stdin, delegating eth0 to the real `bridge` + `host-local` plugins."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import secrets
import shutil
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshnet import watchdog
from meshnet.cni.protocol import DEFAULT_BIN_DIR
from meshnet.command import Command
from meshnet.daemon.netns import NETNS_DIR
from meshnet.executor import Executor
from meshnet.lab.state import LabError, LabNames, PodRecord, StateFile
from meshnet.netns_thread import in_netns

POD_SUBNET = "203.0.113.0/24"  # eth0 of the pods; every node has its own bridge, so subnets may repeat
POD_BRIDGE = "mnl0"  # the eth0 delegate's bridge in each node's namespace
CNI_PLUGIN_DIRS = ("/usr/lib/cni", DEFAULT_BIN_DIR)  # Debian's plugins first
# A kubelet retries a sandbox whose network failed with back-off; CNI error 11 ("try again later")
# is what the shim answers while meshnetd restarts. 0.2 s doubling to 5 s, for up to a minute.
RETRY_FIRST, RETRY_MAX, RETRY_FOR = 0.2, 5.0, 60.0
# MESHNET_TIMING=1: each ADD's phases (state file, netns, the CNI binary) as one JSON line in
# <lab>/kubelet-timing.log, for benchmarks/phases.py. Off by default.
TIMING = os.environ.get("MESHNET_TIMING", "") == "1"


def default_cni_bin() -> list[str]:
    """The shim as a host without meshnet's venv would run it: this Python with no site packages
    (-S -E; the shim needs only the standard library), which starts ~20 ms faster than the venv's
    console script. `--cni-bin` runs another binary, e.g. the standalone one (`make cni-binary`)."""
    root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {root!r}); from meshnet.cni.shim import main; sys.exit(main())"
    return [sys.executable, "-S", "-E", "-c", code]


# struct ifreq (40 bytes on Linux): the interface name, then the flags (a short) of the union.
_IFREQ = struct.Struct("16sH22x")
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """lo up in the calling thread's network namespace (an ioctl on a socket made there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _, flags = _IFREQ.unpack(fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0)))
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def make_sandbox(executor: Executor, netns: str) -> None:
    """A pod's sandbox: a named network namespace with lo up, as a runtime makes it. lo is brought
    up in-process by a thread inside the namespace: one `ip` process per sandbox, not two (a lab of
    750 pods started 1500 processes for its sandboxes, on 2 cores)."""
    executor.run_sequence([Command(None, ("netns", "add", netns))])
    in_netns(netns, loopback_up)


def pod_bridge_commands(netns: str, index: int) -> list[Command]:
    """The eth0 delegate's bridge on a node, made before its first pod, with an address set by hand.

    When the `bridge` plugin makes the bridge, each ADD reads its address, adds its port (the kernel
    moves an unset bridge's address to its lowest port's), then sets the address it read and puts the
    one it reads back in its result. Two first ADDs at once on a node can set different addresses: a
    pod's result may then name one the bridge no longer has, and its CHECK fails for good ("Bridge
    interface mnl0 Mac doesn't match"). The kernel keeps an address that was set (NET_ADDR_SET)
    whatever the ports, and the plugin uses a bridge that already exists. Locally administered, one
    per node.
    """
    mac = f"02:6d:6e:00:{index // 256:02x}:{index % 256:02x}"
    return [Command(netns, ("link", "add", POD_BRIDGE, "address", mac, "type", "bridge")),
            Command(netns, ("link", "set", POD_BRIDGE, "up"))]


def check_cni_plugins() -> None:
    """The delegate plugins every pod's eth0 needs are installed."""
    for plugin in ("bridge", "host-local"):
        if not any((Path(d) / plugin).exists() for d in CNI_PLUGIN_DIRS):
            raise LabError(f"CNI plugin {plugin} not found in {', '.join(CNI_PLUGIN_DIRS)} "
                           "(install Debian's containernetworking-plugins: `make setup`)")


@dataclass(eq=False)
class _Change:
    pod: str
    changes: dict[str, Any]
    done: bool = False  # guarded by RecordWriter._writing
    result: PodRecord | None = None
    error: BaseException | None = None


class RecordWriter:
    """Changes to pod records, several per write of the state file (a group commit).

    The state file holds every pod's record (with its ADD result) and is read-compared and written
    whole in a transaction under the lab's lock, so a write costs in proportion to the lab: one
    per change made `lab up` quadratic in its pods (750 pods: two ~0.2 s writes per ADD, in turn,
    the largest part of the bring-up's wall time). Here the caller that gets the writer's lock
    writes its own change and every change queued meanwhile in one transaction; the others find
    theirs written when they get the lock. Each caller still returns only once its change is in
    the file, so the order "recorded before the ADD" holds as before."""

    def __init__(self, names: LabNames, file: StateFile) -> None:
        self._names = names
        self._file = file
        self._queue_lock = threading.Lock()
        self._queue: list[_Change] = []  # guarded by `_queue_lock`
        self._writing = threading.Lock()  # one transaction of this writer at a time
        self.transactions = 0  # guarded by `_writing` (tests: changes per write)

    def record(self, pod: str, changes: dict[str, Any]) -> PodRecord:
        change = _Change(pod, changes)
        with self._queue_lock:
            self._queue.append(change)
        with self._writing:
            if not change.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._write(batch)
        if change.error is not None:
            raise change.error
        assert change.result is not None
        return change.result

    def _write(self, batch: list[_Change]) -> None:
        """One transaction for `batch`: a missing pod fails its own change, a failed write every
        change of the batch (each caller raises it)."""
        self.transactions += 1
        try:
            with self._file.transaction(pods=[c.pod for c in batch]) as st:
                for c in batch:
                    rec = st.pods.get(c.pod)
                    if rec is None:
                        c.error = LabError(f"no pod {c.pod!r} in lab {self._names.name}")
                        continue
                    for k, v in c.changes.items():
                        setattr(rec, k, v)
                    c.result = replace(rec)
        except BaseException as e:
            for c in batch:
                c.error = c.error or e
        finally:
            for c in batch:
                c.done = True


class Kubelet:
    """ADD, DEL and restart of the lab's pods, each recorded in the state file (`LabState.pods`)."""

    def __init__(self, names: LabNames, file: StateFile, executor: Executor,
                 progress: Callable[[str], None]) -> None:
        self.names = names
        self.file = file
        self.executor = executor
        self._progress = progress
        self.retry_for = RETRY_FOR  # how long an ADD answering CNI error 11 is retried
        self._writer = RecordWriter(names, file)

    @property
    def record_writes(self) -> int:
        """Writes of the state file by pod record changes so far (several changes per write)."""
        return self._writer.transactions

    def cni_config(self, node: str) -> dict[str, Any]:
        name, lab_dir = self.names.name, self.names.dir
        return {
            "cniVersion": "1.0.0",
            "name": f"meshnet-{name}",
            "type": "meshnet",
            "daemon_socket": str(self.names.socket(node)),
            "log_file": str(lab_dir / "cni.log"),
            "topology_index": str(self.names.topology_index(node)),
            "delegate": {
                "cniVersion": "1.0.0",
                "name": f"{name}-eth0",
                "plugins": [{
                    "type": "bridge", "bridge": POD_BRIDGE, "isGateway": True, "ipMasq": False,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                             "dataDir": str(lab_dir / "ipam" / node)},
                }],
            },
        }

    def cni(self, command: str, rec: PodRecord) -> tuple[int, dict[str, Any]]:
        """Run the CNI binary exactly as a kubelet's runtime does: env + config on stdin."""
        st = self.file.state
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": rec.container_id,
            "CNI_NETNS": str(NETNS_DIR / rec.netns),
            "CNI_IFNAME": "eth0",
            "CNI_PATH": ":".join(CNI_PLUGIN_DIRS),
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={rec.namespace};K8S_POD_NAME={rec.name};"
                        f"K8S_POD_INFRA_CONTAINER_ID={rec.container_id}",
            "PATH": st.cni_env_path or os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        conf = self.cni_config(rec.node)
        if command in ("DEL", "CHECK") and rec.result:
            conf["prevResult"] = rec.result
        # On the pod's node, as its kubelet would: whatever the CNI binary does itself (a delegate it
        # runs while meshnetd is down, e.g. the bridge plugin) stays inside the node's namespace,
        # never on this machine's own network.
        node_ns = NETNS_DIR / self.names.node_netns(st.nodes.index(rec.node))
        # nsenter found on our PATH: the CNI binary's own PATH may be a host's without it.
        argv = [shutil.which("nsenter") or "/usr/bin/nsenter", f"--net={node_ns}", "--", *st.cni_bin]
        proc = watchdog.run(argv, input=json.dumps(conf).encode(), env=env, timeout=600)  # no exit polling
        try:
            answer = json.loads(proc.stdout or b"{}")
        except ValueError:
            answer = {"code": 999, "msg": "CNI plugin printed no JSON", "details": proc.stdout[-500:].decode()}
        return proc.returncode, answer

    @contextlib.contextmanager
    def _pod_lock(self, pod: str) -> Iterator[None]:
        """One operation at a time on a pod (a kubelet's per-pod worker), across processes; operations
        on different pods run in parallel."""
        d = self.names.dir / "pods"
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f"{pod}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _record(self, pod: str, **changes: Any) -> PodRecord:
        """Change a pod's record in the state file (read again, changed, written back under the
        lab's lock) and return it as written; see `RecordWriter`."""
        return self._writer.record(pod, changes)

    def add_pod(self, pod: str, *, retry_for: float | None = None) -> PodRecord:
        """A new sandbox for `pod` and its ADD; an ADD that answers CNI error 11 (try again later:
        meshnetd restarting) is retried with back-off, as a kubelet does, for up to `retry_for` seconds."""
        with self._pod_lock(pod):
            return self._add(pod, self.retry_for if retry_for is None else retry_for)

    def _add(self, pod: str, retry_for: float) -> PodRecord:
        started = time.monotonic()
        marks: list[tuple[str, float]] = [("start", time.perf_counter())]
        # Recorded before the ADD: whoever looks next (a `down`, say) DELs this sandbox.
        rec = self._record(pod, container_id=secrets.token_hex(32), result={}, state="adding", error="")
        marks.append(("state file (adding)", time.perf_counter()))
        if not (NETNS_DIR / rec.netns).exists():
            make_sandbox(self.executor, rec.netns)
        marks.append(("sandbox netns", time.perf_counter()))
        delay = RETRY_FIRST
        while True:
            rc, answer = self.cni("ADD", rec)
            marks.append(("CNI binary (ADD)", time.perf_counter()))
            waited = time.monotonic() - started
            if rc == 0 or answer.get("code") != 11 or waited + delay > retry_for:
                break
            self._progress(f"{pod}: CNI error 11 ({answer.get('msg')}); retrying in {delay:.1f}s")
            # As a runtime does with a sandbox whose network failed: DEL it before the next try.
            self.cni("DEL", rec)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        seconds = round(time.monotonic() - started, 3)
        if rc == 0:
            links = sum(1 for i in answer.get("interfaces", []) if i.get("sandbox") and i.get("name") != "eth0")
            done = self._record(pod, state="up", error="", result=answer, links=links, seconds=seconds)
        else:
            error = f"CNI error {answer.get('code')}: {answer.get('msg')}" + (
                f": {answer['details']}" if answer.get("details") else "")
            done = self._record(pod, state="failed", error=error, links=0, seconds=seconds)
        if TIMING:
            marks.append(("state file (result)", time.perf_counter()))
            self._log_timing(pod, rec.container_id, marks)
        return done

    def _log_timing(self, pod: str, container_id: str, marks: list[tuple[str, float]]) -> None:
        phases: dict[str, float] = {}
        for (_, before), (phase, after) in itertools.pairwise(marks):
            phases[phase] = round(phases.get(phase, 0.0) + (after - before) * 1000, 2)
        line = json.dumps({"pod": pod, "container": container_id[:12], "start": marks[0][1],
                           "total_ms": round((marks[-1][1] - marks[0][1]) * 1000, 2), "phases": phases})
        with open(self.names.dir / "kubelet-timing.log", "a") as f:
            f.write(line + "\n")

    def add_pods(self, pods: list[str], workers: int = 8) -> None:
        done = 0

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pods) or 1))) as pool:
            for rec in pool.map(self.add_pod, pods):
                done += 1
                mark = "ok" if rec.state == "up" else "FAILED"
                # Links whose peers were up at its ADD; the others are built by the peers' ADDs.
                extra = f"{rec.links} link(s) in its ADD result" if rec.state == "up" else rec.error
                self._progress(f"[{done}/{len(pods)}] {rec.name} on {rec.node}: {mark} ({extra}, {rec.seconds:.2f}s)")

    def del_pod(self, pod: str, *, remove_netns: bool = True) -> PodRecord:
        with self._pod_lock(pod):
            return self._del(pod, remove_netns)

    def _del(self, pod: str, remove_netns: bool) -> PodRecord:
        found = self.file.reload().pods.get(pod)
        if found is None:
            raise LabError(f"no pod {pod!r} in lab {self.names.name}")
        rec = replace(found)
        if rec.container_id:
            rc, answer = self.cni("DEL", rec)
            if rc != 0:
                raise LabError(f"CNI DEL of {pod} failed: {answer.get('msg')}: {answer.get('details', '')}")
        if remove_netns:
            self.executor.run_best_effort([Command(None, ("netns", "del", rec.netns))])
        return self._record(pod, state="down", container_id="", links=0, result={})

    def restart_pod(self, pod: str, node: str = "") -> PodRecord:
        """What a pod restart does to the network: DEL, a new sandbox (new netns), ADD — on `node`
        when given (a pod rescheduled elsewhere)."""
        st = self.file.state
        if node and node not in st.nodes:
            raise LabError(f"no node {node!r} in lab {self.names.name} (nodes: {', '.join(st.nodes)})")
        with self._pod_lock(pod):
            self._del(pod, True)
            if node:
                self._record(pod, node=node)
            return self._add(pod, self.retry_for)
