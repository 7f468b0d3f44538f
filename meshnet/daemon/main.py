"""meshnetd: one per node. Serves the CNI shim (unix socket) and peer daemons (gRPC), reconciles."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from meshnet import naming
from meshnet.daemon import memory
from meshnet.daemon.config import DaemonConfig, hold_instance_locks, parse_args
from meshnet.executor import Executor, Journal, open_journal
from meshnet.plan import DEFAULT_MTU, NodeInfo

if TYPE_CHECKING:
    from meshnet.daemon.node import NodeDaemon
    from meshnet.model import Topology
    from meshnet.store.base import WatchEvent

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
    if cfg.single_node:
        # Every peer is on this host, so every link is a veth: the VTEP is never used and nothing
        # has to be created on the host to stand in for one.
        return NodeInfo(cfg.node_name, "127.0.0.1", "lo", macvlan_parents=frozenset(cfg.macvlan_parents))
    entries = executor.show(None)
    for entry in entries:
        addrs = [a.get("local") for a in entry.get("addr_info", ())]
        if (cfg.host_intf and entry.get("ifname") == cfg.host_intf) or (cfg.host_ip and cfg.host_ip in addrs):
            ip = cfg.host_ip or next((a for a in addrs if a and ":" not in a), "")
            if not ip:
                break
            return NodeInfo(cfg.node_name, ip, str(entry["ifname"]), None, int(entry.get("mtu") or DEFAULT_MTU),
                            frozenset(cfg.macvlan_parents))
    raise SystemExit(f"meshnetd: no interface carries HOST_IP={cfg.host_ip!r} / HOST_INTF={cfg.host_intf!r}; "
                     "set one of them to the node's underlay address or interface")


class ReconcileLoop:
    """One thread converges the node: everything at start and every `resync` seconds (the pods the
    cache shows alive here: no API call), and the pods a store change concerns as soon as the
    informer reports it (changes within 50 ms are batched)."""

    def __init__(self, core: NodeDaemon, resync: float, stopping: threading.Event, ready: threading.Event) -> None:
        self.core = core
        self.resync = resync
        self.stopping = stopping
        self.ready = ready
        self._pending: set[tuple[str, str]] = set()
        self._full = True
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def on_event(self, event: WatchEvent, old: Topology | None) -> None:
        """An informer event (the cache has it already): queue the pods it concerns."""
        targets = self.core.on_store_event(event.type, event.topology, old)
        if targets:
            with self._lock:
                self._pending |= targets
            self._wake.set()

    def on_watch_error(self, e: Exception) -> None:
        """The watch broke and is started again (its list is diffed against the cache, so the
        events missed meanwhile still come); a full pass covers the gap as well."""
        log(event="watch-error", error=f"{type(e).__name__}: {e}")
        with self._lock:
            self._full = True

    def run(self) -> None:
        # The first pass reads the informer's cache: wait for its first list (CNI calls meanwhile
        # read the store directly).
        while not self.core.state.cache.wait_synced(0.5) and not self.stopping.is_set():
            pass
        next_full = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_full:
                with self._lock:
                    self._full = True
                next_full = now + self.resync
            # Store changes made by a CNI call in progress mostly settle with that call; looking at
            # the kernel meanwhile would only compete with it for the CPU (ADD latency). Wait for a
            # quiet moment, but not for long: a stream of ADDs must not starve the reconciler.
            quiet_by = time.monotonic() + 1.0
            while self.core.busy and time.monotonic() < quiet_by and not self.stopping.is_set():
                self.stopping.wait(0.02)
            retry = self.core.take_retries()  # checked every turn: at least once a second
            with self._lock:
                self._pending |= retry
            with self._lock:
                full, targets = self._full, self._pending
                self._full, self._pending = False, set()
            if full or targets:
                try:
                    changed = self.core.reconcile(None if full else targets)
                    if changed:
                        log(event="reconcile", full=full, pods=len(targets), changed=changed)

                except Exception as e:  # retried at the next change or tick
                    log(event="reconcile-error", error=f"{type(e).__name__}: {e}")
                    with self._lock:
                        self._full = True
                    self.stopping.wait(1.0)
                finally:
                    memory.trim_soon()  # the pass's kernel views and plans are freed: give their pages back
                self.ready.set()
            self._wake.wait(max(0.0, min(1.0, next_full - time.monotonic())))
            if self._wake.is_set():
                self._wake.clear()
                self.stopping.wait(0.05)  # gather a burst of changes into one pass


def _warm_templates(ready: threading.Event, stopping: threading.Event) -> None:
    while not ready.wait(0.5):
        if stopping.is_set():
            return
    try:
        from meshnet import render

        render.warm()
    except Exception as e:  # a template that cannot render fails its first ADD, which says so
        log(event="templates-warm-failed", error=f"{type(e).__name__}: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    # Before the journal, the socket or the kernel is touched: one meshnetd per node (issue 13).
    locks = hold_instance_locks(cfg)  # noqa: F841 - held, by their open descriptors, until the process ends
    # Nothing in the daemon reads its journal back: the file (if any) and the log say what ran.
    journal: Journal = open_journal(cfg.journal or None, keep=0)
    executor = Executor(journal=journal, log=log)
    # Two questions every start asks the kernel (`ip` and `tc` processes), asked while the
    # interpreter imports the rest: a restarted daemon is ready sooner (issue 12's restart figure).
    with ThreadPoolExecutor(2, thread_name_prefix="start") as early:
        found = early.submit(discover_node, cfg, executor)
        early.submit(executor.capabilities)  # cached by the executor; the first pass needs it
        # Heavy imports only after the arguments are known to be good.
        from meshnet.daemon.api import ApiServer
        from meshnet.daemon.node import NodeDaemon
        from meshnet.daemon.peers import GrpcPeerClient, serve
        from meshnet.daemon.topo_index import TopologyIndex
        from meshnet.store import open_store
        from meshnet.store.cache import Informer

        node = found.result()
    store = open_store(cfg.store_url)
    peers = GrpcPeerClient(tls=cfg.tls)
    core = NodeDaemon(node, store, executor, peers, grpc_port=cfg.grpc_port, cni_path=cfg.cni_path, log=log,
                      sandbox_record=cfg.sandbox_record)
    # Peers' news about a pod's links is gathered while the node is busy (a rollout: one write per
    # pod per window instead of one per link); the status then lags the kernel by up to the window,
    # and `lab up` waits for it to settle (meshnet.lab.cluster).
    core.link_status.window = core.link_status.DAEMON_WINDOW
    stopping = threading.Event()
    ready = threading.Event()

    def health() -> dict[str, Any]:
        return {"node": node.name, "vtep": node.vtep_ip, "ready": ready.is_set()}

    # Unset: the VTEP address, the one address peers dial (loopback with --single-node).
    grpc_bind = cfg.grpc_bind or node.vtep_ip
    grpc_server = serve(core, grpc_bind, cfg.grpc_port, log, cfg.tls)
    # The shim's answer while this daemon is down (issue 13): kept current by its own watch.
    index = TopologyIndex(cfg.topology_index, core.handle, log) if cfg.topology_index else None
    api = ApiServer(cfg.socket_path, index.wrap(core.handle) if index else core.handle, health, log)
    api.start()
    log(event="started", node=node.name, vtep=node.vtep_ip, uplink=node.uplink, socket=cfg.socket_path,
        grpc=naming.host_port(grpc_bind, cfg.grpc_port), tls=cfg.tls is not None,
        macvlan_parents=",".join(cfg.macvlan_parents) or "none", store=cfg.store_url.split("?")[0])

    def on_signal(signum: int, _frame: object) -> None:
        log(event="stopping", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    reconciler = ReconcileLoop(core, cfg.resync_seconds, stopping, ready)
    # The templates compiled and Jinja warmed up (a fresh daemon's first 1500-link render was
    # ~30-50 ms slower), once the first pass is done: warmed while the daemon starts, it competed
    # with that pass for the GIL (daemon restart, 500 links: 0.40 -> 0.50 s, 5 alternations).
    threading.Thread(target=_warm_templates, args=(ready, stopping), name="warm-templates", daemon=True).start()
    # ONE watch of the store feeds the cache every reader uses, the reconciler and the shim's index.
    informer = Informer(core.state.cache, [reconciler.on_event, *([index.on_event] if index else [])],
                        on_error=reconciler.on_watch_error)
    threading.Thread(target=reconciler.run, name="reconcile", daemon=True).start()
    threading.Thread(target=informer.run, args=(store, stopping), name="watch", daemon=True).start()
    if index is not None:
        threading.Thread(target=index.run, args=(core.state.cache, stopping, cfg.resync_seconds),
                         name="topology-index", daemon=True).start()
    # Woken every half second, not only by the event: a process-directed SIGTERM is delivered to
    # any thread not blocking it (gRPC's and the pools' included), and then nothing interrupts the
    # main thread's untimed wait, so the Python handler that sets `stopping` never ran. `lab down`
    # waited 10 s for SIGKILL on one daemon in two (750 routers, 6 nodes); a DaemonSet pod would
    # wait out its whole grace period.
    while not stopping.wait(0.5):
        pass
    api.stop()
    grpc_server.stop(grace=2).wait()
    core.close()
    peers.close()
    store.close()
    log(event="stopped")
    return 0


if __name__ == "__main__":
    code = main()
    # The orderly part is done once main returns (servers stopped, gathered news written, the store
    # closed). A worker thread still inside a call (a peer's gRPC deadline, a thread pool's task)
    # must not keep the process: the interpreter's exit would join it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
