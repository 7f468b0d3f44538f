"""meshnetd's configuration: flags first, then the environment the DaemonSet sets, then defaults."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshnet.cni.protocol import DEFAULT_BIN_DIR, DEFAULT_DAEMON_SOCKET

DEFAULT_GRPC_PORT = 51111


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


def parse_args(argv: Sequence[str] | None, env: Mapping[str, str] | None = None) -> DaemonConfig:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="meshnetd", description="meshnet's per-node daemon")
    p.add_argument("--node-name", default=env.get("NODE_NAME") or socket.gethostname())
    p.add_argument("--host-ip", default=env.get("HOST_IP", ""), help="VTEP address (env HOST_IP)")
    p.add_argument("--host-intf", default=env.get("HOST_INTF", ""), help="VTEP interface (env HOST_INTF)")
    p.add_argument("--grpc-port", type=int, default=int(env.get("GRPC_PORT") or DEFAULT_GRPC_PORT))
    p.add_argument("--grpc-bind", default=env.get("GRPC_BIND", ""),
                   help="env GRPC_BIND; default 0.0.0.0, 127.0.0.1 with --single-node")
    p.add_argument("--socket", default=env.get("MESHNET_SOCKET", DEFAULT_DAEMON_SOCKET))
    p.add_argument("--store", default=env.get("MESHNET_STORE", "kube"),
                   help="kube | kube:?kubeconfig=PATH | sqlite:///path.db (env MESHNET_STORE)")
    p.add_argument("--cni-path", default=env.get("CNI_PATH", f"{DEFAULT_BIN_DIR}:/usr/lib/cni"))
    p.add_argument("--journal", default=env.get("MESHNET_JOURNAL", ""))
    p.add_argument("--resync", type=float, default=float(env.get("MESHNET_RESYNC") or 60.0),
                   help="seconds between full reconciliations")
    p.add_argument("--single-node", action="store_true",
                   help="every pod runs on this host (podman, no Kubernetes): no VTEP needed, veth links only")
    a = p.parse_args(argv)
    if not 0 < a.grpc_port < 65536:
        p.error(f"--grpc-port: {a.grpc_port} is not a TCP port")
    # A single node has no peers: its gRPC port need not be reachable from anywhere but itself.
    grpc_bind = a.grpc_bind or ("127.0.0.1" if a.single_node else "0.0.0.0")
    return DaemonConfig(a.node_name, a.host_ip, a.host_intf, a.grpc_port, grpc_bind, a.socket, a.store,
                        a.cni_path, a.journal, a.resync, a.single_node)
