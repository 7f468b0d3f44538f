"""The lab's processes: one real `meshnetd` per node namespace, and the relay that makes a loopback
Kubernetes API server reachable from the nodes. Started, waited for, stopped (also by a later
`meshnetctl` process, through the pids in the state file)."""

from __future__ import annotations

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


class Supervisor:
    """Starts and stops the lab's daemons; their pids live in the state file (`LabState.daemons`)."""

    def __init__(self, names: LabNames, file: StateFile) -> None:
        self.names = names
        self.file = file
        # Processes this object started: waited for when stopped (no zombie, no ResourceWarning).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def start_daemon(self, node: str) -> int:
        st = self.file.state
        i = st.nodes.index(node)
        info = self.names.node_info(i)
        sock = self.names.socket(node)
        sock.unlink(missing_ok=True)
        log = open(self.names.log(node), "ab")  # noqa: SIM115 - handed to the child process
        argv = ["ip", "netns", "exec", self.names.node_netns(i), sys.executable, "-m", "meshnet.daemon.main",
                "--node-name", node, "--host-ip", info.vtep_ip, "--socket", str(sock),
                "--store", st.store_url, "--grpc-port", str(DEFAULT_GRPC_PORT),
                "--journal", str(self.names.dir / f"{node}.journal"), "--resync", "30",
                # No TLS in the lab: peers are reached on the VTEP address only. macvlan links use the
                # node's eth0 (the lab's only way out to its external namespace), so it is listed.
                "--grpc-bind", info.vtep_ip, "--macvlan-parents", info.uplink,
                "--topology-index", str(self.names.topology_index(node))]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        log.close()
        self._children[proc.pid] = proc
        st.daemons[node] = proc.pid
        self.file.save()
        return proc.pid

    def wait_daemon(self, node: str, timeout: float = 30.0) -> None:
        from meshnet.daemon.api import health_check

        deadline = time.monotonic() + timeout
        pid = self.file.state.daemons[node]
        while time.monotonic() < deadline:
            if not alive(pid):
                tail = self.names.log(node).read_text(errors="replace")[-2000:]
                raise LabError(f"meshnetd on {node} exited:\n{tail}")
            try:
                if health_check(str(self.names.socket(node)), timeout=1.0).get("ready"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise LabError(f"meshnetd on {node} did not become ready in {timeout:.0f}s (log: {self.names.log(node)})")

    def stop_daemon(self, node: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        pid = self.file.state.daemons.pop(node, 0)
        self.file.save()
        child = self._children.pop(pid, None)
        if child is not None and child.poll() is not None:
            return
        if not pid or not alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.02)
        if child is not None:
            child.wait()

    def stop_all(self) -> None:
        """Every daemon and the API relay (`FORWARDER` is kept among the daemons for this)."""
        for node in list(self.file.state.daemons):
            self.stop_daemon(node)

    def restart_daemon(self, node: str) -> None:
        """kill -9 and start again: the daemon must converge from the store and the kernel."""
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
        st.daemons[FORWARDER] = proc.pid
        self.file.save()
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.wait(timeout=10)
            raise LabError(f"cannot relay the Kubernetes API port {port} into the nodes: "
                           f"{proc.stderr.read().decode(errors='replace').strip()}")
        proc.stdout.close()
        proc.stderr.close()
