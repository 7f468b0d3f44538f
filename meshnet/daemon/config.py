"""meshnetd's configuration: flags first, then the environment the DaemonSet sets, then defaults."""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshnet import naming
from meshnet.cni.offline import DEFAULT_INDEX
from meshnet.cni.protocol import DEFAULT_BIN_DIR, DEFAULT_DAEMON_SOCKET
from meshnet.plan import ANY_PARENT

DEFAULT_GRPC_PORT = 51111
# Binding one of these would open the peer port on every interface of the node.
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", "[::]", "*"})


@dataclass(frozen=True)
class TlsPaths:
    """The daemon's mutual-TLS material (the DaemonSet mounts the Secret `meshnet.pki` makes)."""

    ca: str
    cert: str
    key: str


@dataclass(frozen=True)
class DaemonConfig:
    node_name: str
    host_ip: str  # the VTEP: where other nodes send this node's VXLAN traffic
    host_intf: str  # the underlay interface carrying host_ip ("" = find it)
    grpc_port: int
    grpc_bind: str
    socket_path: str
    store_url: str
    cni_path: str  # where delegate plugins live when CNI_PATH does not say
    journal: str  # file to append executed commands to ("" = memory only)
    resync_seconds: float
    single_node: bool = False  # all pods on this host (podman): veth only, no VTEP, gRPC on loopback
    tls: TlsPaths | None = None  # None: plain gRPC, bound to the VTEP address or loopback only
    macvlan_parents: tuple[str, ...] = ()  # host interfaces macvlan links may use ("*": any but the underlay)
    topology_index: str = ""  # the file the shim reads while the daemon is down ("" = none)
    state_dir: str = ""  # where the node-local sandbox record lives ("" = the socket's directory)

    @property
    def sandbox_record(self) -> str:
        """The file of this node's sandbox record (daemon/sandboxes.py): one per node name, so
        daemons sharing a directory (the lab) never share a record."""
        return os.path.join(self.state_dir or os.path.dirname(self.socket_path) or ".",
                            f"sandboxes-{self.node_name}.json")


def parse_args(argv: Sequence[str] | None, env: Mapping[str, str] | None = None) -> DaemonConfig:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="meshnetd", description="meshnet's per-node daemon")
    p.add_argument("--node-name", default=env.get("NODE_NAME") or socket.gethostname())
    p.add_argument("--host-ip", default=env.get("HOST_IP", ""), help="VTEP address (env HOST_IP)")
    p.add_argument("--host-intf", default=env.get("HOST_INTF", ""), help="VTEP interface (env HOST_INTF)")
    p.add_argument("--grpc-port", type=int, default=int(env.get("GRPC_PORT") or DEFAULT_GRPC_PORT))
    p.add_argument("--grpc-bind", default=env.get("GRPC_BIND", ""),
                   help="env GRPC_BIND; default the VTEP address (127.0.0.1 with --single-node); "
                        "every address (0.0.0.0, ::) only with TLS")
    p.add_argument("--tls-ca", default=env.get("MESHNET_TLS_CA", ""),
                   help="CA certificate peers' certificates must chain to (env MESHNET_TLS_CA)")
    p.add_argument("--tls-cert", default=env.get("MESHNET_TLS_CERT", ""),
                   help="this node's certificate; {node} stands for the node name (env MESHNET_TLS_CERT)")
    p.add_argument("--tls-key", default=env.get("MESHNET_TLS_KEY", ""),
                   help="this node's key; {node} stands for the node name (env MESHNET_TLS_KEY)")
    p.add_argument("--macvlan-parents", default=env.get("MACVLAN_PARENTS", ""),
                   help="host interfaces macvlan links may use, comma-separated; '*' = any but the "
                        "node's underlay, which must be listed by name (env MACVLAN_PARENTS; default none)")
    p.add_argument("--socket", default=env.get("MESHNET_SOCKET", DEFAULT_DAEMON_SOCKET))
    p.add_argument("--store", default=env.get("MESHNET_STORE", "kube"),
                   help="kube | kube:?kubeconfig=PATH | sqlite:///path.db (env MESHNET_STORE)")
    p.add_argument("--cni-path", default=env.get("CNI_PATH", f"{DEFAULT_BIN_DIR}:/usr/lib/cni"))
    p.add_argument("--journal", default=env.get("MESHNET_JOURNAL", ""))
    p.add_argument("--resync", type=float, default=float(env.get("MESHNET_RESYNC") or 60.0),
                   help="seconds between full reconciliations")
    p.add_argument("--single-node", action="store_true",
                   help="every pod runs on this host (podman, no Kubernetes): no VTEP needed, veth links only")
    p.add_argument("--topology-index", default=env.get("MESHNET_TOPOLOGY_INDEX", ""),
                   help="keep the Topology index the CNI shim reads while meshnetd is down in this file: the "
                        f"network config's 'topology_index' (default {DEFAULT_INDEX}) names the same one "
                        "(env MESHNET_TOPOLOGY_INDEX; default none)")
    p.add_argument("--state-dir", default=env.get("MESHNET_STATE_DIR", ""),
                   help="directory of the node-local record of the pods' namespaces (env MESHNET_STATE_DIR; "
                        "default the socket's directory, a tmpfs on a node: the record goes with a reboot)")
    a = p.parse_args(argv)
    if not 0 < a.grpc_port < 65536:
        p.error(f"--grpc-port: {a.grpc_port} is not a TCP port")
    tls_files = (a.tls_ca, a.tls_cert, a.tls_key)
    if any(tls_files) and not all(tls_files):
        p.error("--tls-ca, --tls-cert and --tls-key go together (all three, or none for plain gRPC)")
    node_why = naming.k8s_name_problem(a.node_name)
    if node_why and naming.netns_problem(a.node_name):  # it names the sandbox record file
        p.error(f"--node-name (env NODE_NAME): {node_why}")
    if all(tls_files) and node_why:  # it becomes part of file paths and is the certificate's identity
        p.error(f"--node-name (env NODE_NAME): {node_why}")
    tls = TlsPaths(a.tls_ca, a.tls_cert.replace("{node}", a.node_name),
                   a.tls_key.replace("{node}", a.node_name)) if all(tls_files) else None
    # Without TLS anyone who reaches the port is a peer: it must not be reachable on every address.
    # "" is resolved by the daemon once it knows its VTEP (loopback with --single-node).
    if tls is None and a.grpc_bind.strip() in WILDCARD_BINDS:
        p.error(f"--grpc-bind {a.grpc_bind}: every address only with TLS (--tls-ca/--tls-cert/--tls-key); "
                "leave it unset to listen on the VTEP address")
    parents = tuple(dict.fromkeys(x for x in a.macvlan_parents.replace(",", " ").split()))
    for name in parents:
        why = naming.ifname_problem(name) if name != ANY_PARENT else None
        if why:
            p.error(f"--macvlan-parents (env MACVLAN_PARENTS): {why}")
    return DaemonConfig(a.node_name, a.host_ip, a.host_intf, a.grpc_port, a.grpc_bind.strip(), a.socket, a.store,
                        a.cni_path, a.journal, a.resync, a.single_node, tls, parents,
                        a.topology_index, a.state_dir)


def lock_paths(cfg: DaemonConfig) -> tuple[Path, Path]:
    """The files whose locks make a meshnetd the only one for its socket and for its node: next to the
    socket, so that nodes emulated side by side (labs, each with its own directory) do not collide."""
    sock = Path(cfg.socket_path)
    node = cfg.node_name.replace("/", "_")  # a file name even for an odd hostname; the lock is all it names
    return sock.with_name(sock.name + ".lock"), sock.with_name(f"meshnetd-{node}.lock")


def hold_instance_locks(cfg: DaemonConfig) -> list[int]:
    """Take the socket's and the node's lock for the life of this process (the kernel drops them when
    it exits, however it exits), before anything else is touched: a second meshnetd for one node would
    unlink the first one's socket, reconcile the same pods and answer the same peers (issue 13).
    Raises SystemExit naming the holder (its pid, written into the file) when another daemon holds one."""
    fds: list[int] = []
    for path, what in zip(lock_paths(cfg), (f"socket {cfg.socket_path}", f"node {cfg.node_name}"), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            for held in fds:
                os.close(held)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise SystemExit(f"meshnetd: another meshnetd ({who}) already serves {what} (it holds {path}); "
                             "one meshnetd per node: stop that one first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        fds.append(fd)
    return fds
