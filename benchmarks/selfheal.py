"""Self-healing speed, measured on emulated labs (`meshnet.lab.cluster.Lab`, torn down afterwards).

Each function returns {"name", "seconds", "target", "ok", ...details}; nothing is asserted here.

- `daemon_restart()`: a node holding 500 veth links (2 pods, 500 links between them, one node).
  meshnetd is killed with -9; with `wipe=True` every link is also deleted behind its back (both
  pods keep only lo and eth0). Measured: from starting the new daemon process (interpreter start-up
  included) until it has finished its first full pass (health says ready) and the kernel has all
  500 links up and addressed (`seconds`; `links_back_seconds` is the kernel part alone), and until
  the whole lab passes `convergence_problems` (`converged_seconds`, statuses included). Without
  `wipe`, `untouched` says whether every interface kept its ifindex (nothing was made again).
- `pod_restart()`: a pod with 24 links (8 veth to pods of its node, 16 vxlan to pods of two other
  nodes) is deleted and added again. Measured: from the ADD returning until every link, the remote
  vxlan ends included, is back and the lab is converged. `add_seconds` is the ADD itself.
- `hot_change()`: a link added to two running pods on different nodes (vxlan) by writing both
  Topologies to the store. Measured: from the first `store.apply` until both ends are up with
  their addresses in the kernel.

Usage: ``python -m benchmarks.selfheal`` prints the three dicts as JSON.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshnet.command import Command
from meshnet.lab.cluster import Lab
from meshnet.model import Link, Topology
from meshnet.store import open_store
from tests.owned import Claim
from tests.test_selfheal import convergence_problems, link_subnet, mesh_manifest


@contextmanager
def _lab(manifest: str, nodes: int) -> Iterator[Lab]:
    root = Path(tempfile.mkdtemp(prefix="mnb", dir="/tmp"))  # short: the node sockets live there
    lab = Lab(f"b{secrets.token_hex(3)[:5]}", root=root)
    claim = Claim(lab.name, lab.dir, (root,))  # a killed bench's lab: `make clean-netns` reaps it
    try:
        path = root / "manifest.yml"
        path.write_text(manifest)
        lab.up(str(path), nodes)
        failed = {r.name: r.error for r in lab.state.pods.values() if r.state != "up"}
        if failed:
            raise RuntimeError(f"lab did not come up: {failed}")
        yield lab
    finally:
        lab.down()
        shutil.rmtree(root, ignore_errors=True)
        claim.release()


def _until(check: Callable[[], bool], timeout: float, step: float = 0.01) -> float | None:
    """Seconds until `check()` holds (polled), or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(step)
    return None


def _ready(lab: Lab, pod: str, names: Sequence[str]) -> bool:
    """Every interface of `names` exists in the pod, is up and carries a global address."""
    view = {e["ifname"]: e for e in lab.executor.show(lab.pod_netns(pod))}
    for name in names:
        e = view.get(name)
        if e is None or "UP" not in e.get("flags", ()) or not any(
                a.get("scope") == "global" for a in e.get("addr_info", ())):
            return False
    return True


def _converged_after(lab: Lab, t0: float, timeout: float) -> float | None:
    done = _until(lambda: not convergence_problems(lab), timeout, step=0.02)
    return None if done is None else time.monotonic() - t0


def _result(name: str, seconds: float | None, target: float, **details: Any) -> dict[str, Any]:
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in details.items()}
    return {"name": name, "seconds": None if seconds is None else round(seconds, 3), "target": target,
            "ok": seconds is not None and seconds <= target, **rounded}


def daemon_restart(links: int = 500, wipe: bool = False, timeout: float = 30.0) -> dict[str, Any]:
    names = [f"e{uid}" for uid in range(1, links + 1)]
    with _lab(mesh_manifest(["a", "b"], [("a", "b")] * links, nodes={"a": "node0", "b": "node0"}), 1) as lab:
        before = {n: e.get("ifindex") for n, e in lab.kernel_links(lab.pod_netns("a")).items()}
        lab.stop_daemon("node0", signal.SIGKILL)
        if wipe:
            lab.executor.run_best_effort([Command(lab.pod_netns("a"), ("link", "del", n)) for n in names])
            assert set(lab.kernel_links(lab.pod_netns("b"))) == {"lo", "eth0"}  # veth pairs go together
        t0 = time.monotonic()
        lab.start_daemon("node0")
        back = _until(lambda: _ready(lab, "a", names) and _ready(lab, "b", names), timeout, step=0.02)
        # Ready = its first full pass over the node is done: only then has it checked every link.
        ready = _until(lambda: _daemon_ready(lab, "node0"), timeout)
        done = None if back is None or ready is None else time.monotonic() - t0
        converged = _converged_after(lab, t0, timeout)
        after = {n: e.get("ifindex") for n, e in lab.kernel_links(lab.pod_netns("a")).items()}
    return _result(f"daemon restart, node with {links} veth links{', links deleted' if wipe else ''}",
                   done, 2.0, links_back_seconds=back, converged_seconds=converged,
                   untouched=None if wipe else after == before)


def _daemon_ready(lab: Lab, node: str) -> bool:
    from meshnet.daemon.api import health_check

    try:
        return bool(health_check(str(lab.socket(node)), timeout=1.0).get("ready"))
    except OSError:
        return False


def pod_restart(timeout: float = 10.0) -> dict[str, Any]:
    # "x" lives on node0 with 4 neighbours there; 8 neighbours each on node1 and node2.
    local = [f"l{i}" for i in range(4)]
    far = [f"f{i}" for i in range(16)]
    pods = ["x", *local, *far]
    edges = [("x", p) for p in local for _ in range(2)] + [("x", p) for p in far]
    placement = {"x": "node0", **dict.fromkeys(local, "node0"),
                 **{p: f"node{1 + i % 2}" for i, p in enumerate(far)}}
    names = [f"e{uid}" for uid in range(1, len(edges) + 1)]
    with _lab(mesh_manifest(pods, edges, nodes=placement), 3) as lab:
        lab.del_pod("x")
        t_add = time.monotonic()
        rec = lab.add_pod("x")
        t0 = time.monotonic()
        if rec.state != "up":
            raise RuntimeError(f"ADD failed: {rec.error}")
        back = _until(lambda: _ready(lab, "x", names) and all(_ready(lab, p, [n]) for p, n in
                                                               zip([b for _, b in edges], names, strict=True)),
                      timeout)
        converged = _converged_after(lab, t0, timeout)
    return _result(f"pod restart, {len(edges)} links (8 veth, 16 vxlan), back after ADD returns", back, 1.0,
                   converged_seconds=converged, add_seconds=round(t0 - t_add, 3))


def hot_change(timeout: float = 10.0) -> dict[str, Any]:
    with _lab(mesh_manifest(["a", "b"], [("a", "b")], nodes={"a": "node0", "b": "node1"}), 2) as lab:
        store = open_store(lab.state.store_url)
        try:
            ia, ib = (ipaddress.ip_interface(f"{h}/30") for h in list(link_subnet(2).hosts())[:2])
            topos = {t.name: t for t in store.list("default")}
            new = {"a": Link(2, "b", "e2", "e2", ia, ib), "b": Link(2, "a", "e2", "e2", ib, ia)}
            t0 = time.monotonic()
            for pod in ("a", "b"):
                store.apply(Topology(pod, "default", (*topos[pod].links, new[pod])))
            back = _until(lambda: _ready(lab, "a", ["e2"]) and _ready(lab, "b", ["e2"]), timeout, step=0.005)
        finally:
            store.close()
        converged = _converged_after(lab, t0, timeout)
    return _result("hot change, a vxlan link added to two running pods", back, 1.0, converged_seconds=converged)


def run_all() -> list[dict[str, Any]]:
    return [daemon_restart(), daemon_restart(wipe=True), pod_restart(), hot_change()]


if __name__ == "__main__":
    print(json.dumps(run_all(), indent=1))
