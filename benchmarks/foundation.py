"""Foundation benchmarks: rendering 1500 links, and meshnet's executor against bare `ip -batch`.

    python -m benchmarks.foundation          (as root: the replay builds real namespaces)

`render_1500()` and `replay_1500()` return dicts for benchmarks/run.py. The lab is two pods p1, p2
joined by 1500 links eth1..eth1500 with /30s from 100.64.0.0/10 (carrier-grade space, used only
inside our own `mnb-` namespaces, which are always deleted again).
"""

from __future__ import annotations

import ipaddress
import secrets
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from meshnet.command import Command, phases
from meshnet.dryrun import DryRunLab, every_link_plan, layout_for, simulate_adds
from meshnet.executor import Executor
from meshnet.model import Manifest, parse_manifest
from meshnet.render import render

LINKS = 1500
POOL = ipaddress.IPv4Network("100.64.0.0/10")
RENDER_TARGET_S = 0.3
REPLAY_TARGET_RATIO = 1.2


def manifest_text(links: int = LINKS) -> str:
    """Topologies p1, p2 and their pods: `links` links, each a /30 of 100.64.0.0/10."""
    nets = POOL.subnets(new_prefix=30)
    ends: dict[str, list[dict[str, Any]]] = {"p1": [], "p2": []}
    for uid in range(1, links + 1):
        net = next(nets)
        a, b = (f"{h}/{net.prefixlen}" for h in list(net.hosts())[:2])
        intf = f"eth{uid}"
        ends["p1"].append({"uid": uid, "peer_pod": "p2", "local_intf": intf, "peer_intf": intf,
                           "local_ip": a, "peer_ip": b})
        ends["p2"].append({"uid": uid, "peer_pod": "p1", "local_intf": intf, "peer_intf": intf,
                           "local_ip": b, "peer_ip": a})
    docs: list[dict[str, Any]] = [
        {"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": {"name": n}, "spec": {"links": ls}}
        for n, ls in ends.items()]
    docs += [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n}} for n in ends]
    return yaml.safe_dump_all(docs, sort_keys=False)


def lab_commands(manifest: Manifest, prefix: str) -> tuple[DryRunLab, list[Command]]:
    lab = layout_for(manifest, 1, prefix)
    return lab, render(every_link_plan(simulate_adds(manifest, lab.layout)), "add")


def _median(fn: Callable[[], float], runs: int) -> tuple[float, list[float]]:
    samples = [fn() for _ in range(runs)]
    return statistics.median(samples), samples


def render_1500(runs: int = 7) -> dict[str, Any]:
    """Median seconds to plan and render the 1500-link lab (parsing the manifest measured apart)."""
    text = manifest_text()
    t0 = time.perf_counter()
    manifest = parse_manifest(text, "2node-1500links")
    parse_s = time.perf_counter() - t0
    count = 0

    def once() -> float:
        nonlocal count
        start = time.perf_counter()
        _, commands = lab_commands(manifest, "mnb-x-")
        elapsed = time.perf_counter() - start
        count = len(commands)
        return elapsed

    median, samples = _median(once, runs)
    return {"name": "render 2 pods x 1500 links (plan + render)", "median_s": round(median, 4),
            "samples_s": [round(s, 4) for s in samples], "parse_s": round(parse_s, 4), "commands": count,
            "target_s": RENDER_TARGET_S, "ok": median < RENDER_TARGET_S}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=120)


@contextmanager
def _namespaces(lab: DryRunLab) -> Iterator[None]:
    names = [n.netns or "" for n in lab.layout.nodes] + list(lab.layout.pod_netns.values())
    try:
        for name in names:
            _ip("netns", "add", name)
        yield
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=120)


def _bare(commands: list[Command]) -> None:
    """The floor: the same batches, same phases, fed straight to `ip -batch -` (a phase's batches at once)."""
    for phase in phases(commands):
        procs = []
        for ns, batch in phase:
            args = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
            p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
            procs.append((p, "".join(" ".join(c.argv) + "\n" for c in batch)))
        for p, stdin in procs:
            _, err = p.communicate(stdin, timeout=120)
            if p.returncode != 0:
                raise RuntimeError(f"ip -batch failed: {err.strip()}")


def replay_1500(runs: int = 3) -> dict[str, Any]:
    """Build the lab in fresh `mnb-` namespaces with Executor.apply and with bare `ip -batch`; median of each."""
    manifest = parse_manifest(manifest_text(), "2node-1500links")
    lab, commands = lab_commands(manifest, f"mnb-{secrets.token_hex(3)}-")

    def timed(build: Callable[[], None]) -> Callable[[], float]:
        def once() -> float:
            with _namespaces(lab):  # fresh namespaces each run; teardown is not timed
                start = time.perf_counter()
                build()
                return time.perf_counter() - start
        return once

    executor = Executor()
    meshnet_s, meshnet_samples = _median(timed(lambda: executor.apply(commands)), runs)
    floor_s, floor_samples = _median(timed(lambda: _bare(commands)), runs)
    ratio = meshnet_s / floor_s
    return {"name": "replay 2 pods x 1500 veth links (Executor.apply vs bare ip -batch)",
            "meshnet_median_s": round(meshnet_s, 3), "floor_median_s": round(floor_s, 3),
            "meshnet_samples_s": [round(s, 3) for s in meshnet_samples],
            "floor_samples_s": [round(s, 3) for s in floor_samples],
            "commands": len(commands), "ratio": round(ratio, 3), "target_ratio": REPLAY_TARGET_RATIO,
            "ok": ratio <= REPLAY_TARGET_RATIO}


def main() -> int:
    for result in (render_1500(), replay_1500()):
        print(result["name"])
        for key, value in result.items():
            if key != "name":
                print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
