"""meshnetd: one per node. Serves the CNI shim (unix socket) and peer daemons (gRPC), reconciles."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from meshnet.daemon.config import DaemonConfig, parse_args
from meshnet.executor import Executor, Journal, open_journal
from meshnet.plan import DEFAULT_MTU, NodeInfo

_log_lock = threading.Lock()


def log(**event: Any) -> None:
    """Structured logs: one JSON object per line on stderr."""
    event = {"ts": round(time.time(), 3), **event}
    line = json.dumps(event, default=str)
    with _log_lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def discover_node(cfg: DaemonConfig, executor: Executor) -> NodeInfo:
    """The VTEP: HOST_IP on HOST_INTF, or the interface that carries HOST_IP (multi-NIC nodes)."""
    entries = executor.addresses(None)
    for entry in entries:
        addrs = [a.get("local") for a in entry.get("addr_info", ())]
        if (cfg.host_intf and entry.get("ifname") == cfg.host_intf) or (cfg.host_ip and cfg.host_ip in addrs):
            ip = cfg.host_ip or next((a for a in addrs if a and ":" not in a), "")
            if not ip:
                break
            return NodeInfo(cfg.node_name, ip, str(entry["ifname"]), None, int(entry.get("mtu") or DEFAULT_MTU))
    raise SystemExit(f"meshnetd: no interface carries HOST_IP={cfg.host_ip!r} / HOST_INTF={cfg.host_intf!r}; "
                     "set one of them to the node's underlay address or interface")


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    # Heavy imports only after the arguments are known to be good.
    from meshnet.daemon.api import ApiServer
    from meshnet.daemon.core import Meshnet
    from meshnet.daemon.peers import GrpcPeerClient, serve
    from meshnet.store import open_store

    journal: Journal = open_journal(cfg.journal or None)
    executor = Executor(journal=journal, log=log)
    node = discover_node(cfg, executor)
    store = open_store(cfg.store_url)
    peers = GrpcPeerClient()
    core = Meshnet(node, store, executor, peers, grpc_port=cfg.grpc_port, cni_path=cfg.cni_path, log=log)
    stopping = threading.Event()
    ready = threading.Event()

    def health() -> dict[str, Any]:
        return {"node": node.name, "vtep": node.vtep_ip, "ready": ready.is_set()}

    grpc_server = serve(core, cfg.grpc_bind, cfg.grpc_port, log)
    api = ApiServer(cfg.socket_path, core.handle, health, log)
    api.start()
    log(event="started", node=node.name, vtep=node.vtep_ip, uplink=node.uplink, socket=cfg.socket_path,
        grpc=f"{cfg.grpc_bind}:{cfg.grpc_port}", store=cfg.store_url.split("?")[0])

    def on_signal(signum: int, _frame: object) -> None:
        log(event="stopping", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def resync_loop() -> None:
        # Level-triggered: after a crash or an upgrade, and then periodically, converge this node.
        while not stopping.is_set():
            try:
                built = core.reconcile()
                if built:
                    log(event="reconciled", links=built)
            except Exception as e:  # a failed pass is retried at the next tick
                log(event="reconcile-error", error=f"{type(e).__name__}: {e}")
            ready.set()
            stopping.wait(cfg.resync_seconds)

    threading.Thread(target=resync_loop, name="resync", daemon=True).start()
    stopping.wait()
    api.stop()
    grpc_server.stop(grace=2).wait()
    core.close()
    peers.close()
    store.close()
    log(event="stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
