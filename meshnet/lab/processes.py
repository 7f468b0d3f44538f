"""The lab's processes: one real `meshnetd` per node namespace, and the relay that makes a loopback
Kubernetes API server reachable from the nodes. Started, waited for, stopped (also by a later
`meshnetctl` process, through the pids in the state file)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from meshnet.daemon.config import DEFAULT_GRPC_PORT
from meshnet.lab.state import LabError, LabNames, StateFile

FORWARDER = "kube-api-forward"  # key of the API relay's pid in LabState.daemons


def alive(pid: int) -> bool:
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


def _cmdline(pid: int) -> list[str]:
    """The live process `pid`'s argv ([] when it is gone or a zombie)."""
    if not alive(pid):
        return []
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


class Supervisor:
    """Starts and stops the lab's daemons. Their pids are kept in the state file (`LabState.daemons`),
    but a pid is only ever signalled once /proc shows it is that lab node's meshnetd, and a node's
    daemon is also found by its command line (`--socket <lab dir>/<node>.sock`): a stale or lost
    state file never makes the lab kill a stranger or start a second daemon beside a running one."""

    def __init__(self, names: LabNames, file: StateFile) -> None:
        self.names = names
        self.file = file
        # Processes this object started: waited for when stopped (no zombie, no ResourceWarning).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # --- finding the lab's processes by name ---------------------------------------------------------

    def is_daemon(self, pid: int, node: str) -> bool:
        argv = _cmdline(pid)
        return "meshnet.daemon.main" in argv and _flag(argv, "--socket") == str(self.names.socket(node))

    def daemon_pids(self, node: str = "") -> list[int]:
        """The running meshnetd of `node` (of every node of the lab when ""), found in /proc."""
        found = []
        for pid, argv in self._scan():
            if "meshnet.daemon.main" not in argv:
                continue
            sock = Path(_flag(argv, "--socket"))
            if (sock == self.names.socket(node)) if node else (sock.parent == self.names.dir):
                found.append(pid)
        return found

    def relay_pids(self) -> list[int]:
        """The lab's API relays (their arguments are the lab's node namespaces)."""
        return [pid for pid, argv in self._scan() if "meshnet.lab.forward" in argv
                and any(a.startswith(self.names.prefix) for a in argv)]

    @staticmethod
    def _scan() -> list[tuple[int, list[str]]]:
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                argv = _cmdline(int(entry.name))
                if argv:
                    out.append((int(entry.name), argv))
        return out

    def _reap(self) -> None:
        """Wait for children another process stopped (a `lab daemon restart` run elsewhere)."""
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    # --- starting and stopping -------------------------------------------------------------------

    def start_daemon(self, node: str) -> int:
        """Start `node`'s meshnetd unless one runs already (then that one is recorded and returned)."""
        self._reap()
        with self.file.transaction() as st:
            running = self.daemon_pids(node)
            if running:
                st.daemons[node] = running[0]
                return running[0]
            i = st.nodes.index(node)
            info = self.names.node_info(i)
            sock = self.names.socket(node)
            log = open(self.names.log(node), "ab")  # noqa: SIM115 - handed to the child process
            argv = ["ip", "netns", "exec", self.names.node_netns(i), sys.executable, "-m", "meshnet.daemon.main",
                    "--node-name", node, "--host-ip", info.vtep_ip, "--socket", str(sock),
                    "--store", st.store_url, "--grpc-port", str(DEFAULT_GRPC_PORT),
                    "--journal", str(self.names.dir / f"{node}.journal"), "--resync", "30",
                    # No TLS in the lab: peers are reached on the VTEP address only. macvlan links use
                    # the node's eth0 (the lab's only way out to its external namespace), so it is listed.
                    "--grpc-bind", info.vtep_ip, "--macvlan-parents", info.uplink,
                    "--topology-index", str(self.names.topology_index(node))]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
            log.close()
            self._children[proc.pid] = proc
            st.daemons[node] = proc.pid
            return proc.pid

    def wait_daemon(self, node: str, timeout: float = 30.0) -> None:
        from meshnet.daemon.api import health_check

        deadline = time.monotonic() + timeout
        pid = self.file.reload().daemons.get(node, 0)
        while time.monotonic() < deadline:
            if not alive(pid):
                # Another command may be restarting it: looked for under the lab's lock, which a
                # restart holds from the kill to the start of the new daemon.
                with self.file.locked():
                    others = self.daemon_pids(node)
                if not others:
                    tail = self.names.log(node).read_text(errors="replace")[-2000:]
                    raise LabError(f"meshnetd on {node} exited:\n{tail}")
                pid = others[0]
            try:
                if health_check(str(self.names.socket(node)), timeout=1.0).get("ready"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise LabError(f"meshnetd on {node} did not become ready in {timeout:.0f}s (log: {self.names.log(node)})")

    def stop_daemon(self, node: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        with self.file.transaction() as st:
            recorded = st.daemons.pop(node, 0)
            victims = set(self.daemon_pids(node))
            if recorded and self.is_daemon(recorded, node):
                victims.add(recorded)
            self._stop(victims, sig, timeout)

    def stop_all(self) -> None:
        """Every daemon of the lab and its API relay, found by their command lines (also when the state
        file is damaged or gone), and any recorded pid that /proc confirms."""
        victims = set(self.daemon_pids()) | set(self.relay_pids())
        try:
            st = self.file.reload()
        except LabError:
            st = None
        if st is not None:
            for node, pid in st.daemons.items():
                is_relay = node == FORWARDER and "meshnet.lab.forward" in _cmdline(pid)
                if is_relay or self.is_daemon(pid, node):
                    victims.add(pid)
        self._stop(victims, signal.SIGTERM, 10.0)
        if st is not None:
            with self.file.transaction() as st2:
                st2.daemons.clear()

    def _stop(self, pids: set[int], sig: int, timeout: float) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        while any(alive(p) for p in pids):
            time.sleep(0.02)
        for pid in pids:
            child = self._children.pop(pid, None)
            if child is not None:
                child.wait()
        self._reap()

    def restart_daemon(self, node: str) -> None:
        """kill -9 and start again: the daemon must converge from the store and the kernel. Stop and
        start under the lab's lock, so two restarts at once never leave two daemons."""
        with self.file.locked():
            self.stop_daemon(node, signal.SIGKILL)
            self.start_daemon(node)
        self.wait_daemon(node)

    def forward_loopback_api(self, kubeconfig: str) -> None:
        """Node namespaces have their own `lo`: relay a loopback API server's port into each of them."""
        port = loopback_api_port(kubeconfig)
        if port is None:
            return
        st = self.file.state
        argv = [sys.executable, "-m", "meshnet.lab.forward", "--port", str(port),
                *(self.names.node_netns(i) for i in range(len(st.nodes)))]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        # Kept with the daemons so that `down` stops it like one (and waits for it: no zombie).
        self._children[proc.pid] = proc
        with self.file.transaction() as st:
            st.daemons[FORWARDER] = proc.pid
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.wait(timeout=10)
            raise LabError(f"cannot relay the Kubernetes API port {port} into the nodes: "
                           f"{proc.stderr.read().decode(errors='replace').strip()}")
        proc.stdout.close()
        proc.stderr.close()
