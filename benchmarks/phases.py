"""Where one CNI ADD's time goes, phase by phase (root; a lab per case, always taken down).

    python -m benchmarks.phases [--runs 15] [--only add|random]

Runs the labs with MESHNET_TIMING=1: each meshnetd logs one `timing` event per ADD (store read,
netns checks, sandbox record, status writes, plan, render, `ip`, peer call, eth0 delegate...), and
the lab's kubelet logs its own side (state file, sandbox namespace, the CNI binary: nsenter +
Python + shim + the daemon's work). Printed: the median of each phase over the ADDs, and for the
concurrent case the sum over all ADDs too (what the 2 cores spent, not wall time).

Cases: `add`, the 4-link hub ADD of `lab_bench.add_latency` (peers up, DEL between ADDs);
`random`, the 100 pods / 300 links of `lab_bench.random_topology` (8 ADDs at a time, 3 nodes);
`links1`, `links2`, the 2 pods x 1500 links of `lab_bench.many_links` on one and two nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["MESHNET_TIMING"] = "1"  # before the lab (and its daemons' environment) is made

from benchmarks.foundation import manifest_text as two_pod_manifest
from benchmarks.lab_bench import bench_lab, cold_add_seconds, hub_manifest, machine_cpu, random_manifest
from meshnet.lab.cluster import Lab
from meshnet.lab.reports import daemon_events


def _daemon_events(lab: Lab, verb: str = "ADD") -> tuple[list[dict[str, Any]], list[float]]:
    adds: list[dict[str, Any]] = []
    eth0: list[float] = []
    for node in lab.state.nodes:
        for e in daemon_events(lab.names, node):
            if e.get("event") == "timing" and e.get("verb") == verb:
                adds.append(e)
            elif e.get("event") == "timing-eth0":
                eth0.append(float(e["ms"]))
    return adds, eth0


def _kubelet_events(lab: Lab) -> list[dict[str, Any]]:
    path = lab.dir / "kubelet-timing.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _table(title: str, rows: list[dict[str, float]], totals: bool) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    out = [title, f"  {'phase':<28} {'median ms':>10} {'max ms':>9}" + (f" {'sum s':>8}" if totals else "")]
    for k in names:
        vals = [r.get(k, 0.0) for r in rows]
        line = f"  {k:<28} {statistics.median(vals):>10.2f} {max(vals):>9.2f}"
        out.append(line + (f" {sum(vals) / 1000:>8.2f}" if totals else ""))
    return out


def report(lab: Lab, skip_first: int = 0, totals: bool = False) -> dict[str, Any]:
    adds, eth0 = _daemon_events(lab)
    kube = _kubelet_events(lab)
    adds = adds[skip_first:]  # the kubelet's log holds only the ADDs measured
    daemon_rows = [{**e["phases"], "TOTAL (daemon)": e["total_ms"]} for e in adds]
    # What the CNI binary's wall time holds beyond the daemon's own work: nsenter, Python start,
    # the shim's imports, the socket and JSON both ways.
    by_container = {e["container"]: e["total_ms"] for e in adds}
    kube_rows = []
    for k in kube:
        row = dict(k["phases"])
        if k["container"] in by_container:
            row["  of which outside meshnetd"] = row.get("CNI binary (ADD)", 0.0) - by_container[k["container"]]
        row["TOTAL (kubelet)"] = k["total_ms"]
        kube_rows.append(row)
    lines = _table(f"meshnetd, {len(adds)} ADDs", daemon_rows, totals)
    if eth0:
        lines += [f"  (eth0 delegate, on its own thread: median {statistics.median(eth0):.2f} ms, "
                  f"max {max(eth0):.2f} ms)"]
    peer = [{**e["phases"], "TOTAL (receiver)": e["total_ms"]} for e in _daemon_events(lab, "PEER-UPDATE")[0]]
    if peer:
        lines += _table(f"meshnetd, {len(peer)} peer updates received (far ends built)", peer, totals)
    lines += _table(f"lab kubelet, {len(kube)} ADDs", kube_rows, totals)
    print("\n".join(lines), flush=True)
    return {"daemon": daemon_rows, "kubelet": kube_rows, "eth0_ms": eth0}


def hub_add(runs: int) -> dict[str, Any]:
    with bench_lab("phub", hub_manifest(4), 1) as (lab, _):
        (lab.dir / "kubelet-timing.log").unlink(missing_ok=True)
        before = len(_daemon_events(lab)[0])  # the bring-up's ADDs are not counted
        samples = []
        for _ in range(runs):
            lab.del_pod("h", remove_netns=False)
            rec = lab.add_pod("h")
            if rec.state != "up":
                raise RuntimeError(f"hub ADD failed: {rec.error}")
            samples.append(rec.seconds)
        print(f"4-link hub ADD, {runs} runs: median {statistics.median(samples) * 1000:.1f} ms (kubelet's figure)")
        return report(lab, skip_first=before)


def _proc_cpu(pid: int) -> tuple[float, float]:
    """(own CPU, CPU of its reaped children) of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _cpu_now(lab: Lab) -> dict[str, Any]:
    return {"self": resource.getrusage(resource.RUSAGE_SELF), "kids": resource.getrusage(resource.RUSAGE_CHILDREN),
            "daemons": [_proc_cpu(lab.state.daemons[n]) for n in lab.state.nodes], "machine": machine_cpu(),
            "wall": time.perf_counter()}


def _cpu_between(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    def used(r: resource.struct_rusage) -> float:
        return float(r.ru_utime + r.ru_stime)

    out = {
        "meshnetd (Python)": sum(d[0] for d in b["daemons"]) - sum(d[0] for d in a["daemons"]),
        "meshnetd's children (ip, tc, eth0 plugins)": sum(d[1] for d in b["daemons"]) - sum(d[1] for d in a["daemons"]),
        "lab kubelet (this process)": used(b["self"]) - used(a["self"]),
        "CNI binaries, nsenter, ip netns add": used(b["kids"]) - used(a["kids"]),
        "machine busy (all processes, kernel threads)": b["machine"][0] - a["machine"][0],
        "machine idle": b["machine"][1] - a["machine"][1],
    }
    return {k: round(v, 2) for k, v in out.items()}


def cpu_report(lab: Lab, start: dict[str, Any]) -> dict[str, float]:
    """Who spent the machine's CPU from the first ADD on: the daemons (Python), what they ran (`ip`,
    `tc`, the eth0 delegate plugins; counted once reaped), this process (the lab's kubelet) and its
    children (the CNI binaries through nsenter, `ip netns add`); and the whole machine's busy and
    idle time (/proc/stat). Two tallies: until the last ADD returned (when, in the ISP runs, every
    link is already up: the first poll after `lab up` finds them so), and until now (with `lab up`'s
    own wait for settled statuses and its summary, which poll the store and the kernel: harness
    work that grows with the lab but is not in the figure)."""
    now = _cpu_now(lab)
    tallies = [("until the last ADD returned", start["adds_done"])] if "adds_done" in start else []
    tallies.append(("until every link was up, with lab up's settle wait and summary", now))
    out: dict[str, float] = {}
    for title, snap in tallies:
        out = _cpu_between(start["first_add"], snap)
        print(f"CPU seconds from the first ADD {title} ({snap['wall'] - start['first_add']['wall']:.1f} s wall, "
              f"{os.cpu_count()} cores):")
        for k, v in out.items():
            print(f"  {k:<44} {v:>7.2f}")
    if "adds_done" in start:
        return _cpu_between(start["first_add"], start["adds_done"])
    return out


@contextlib.contextmanager
def _counted_from_first_add() -> Iterator[dict[str, Any]]:
    """While open, `Lab.add_pods` notes the CPU used so far (this process, its children, the lab's
    daemons, the machine) and the wall clock into the dict yielded, before its first ADD
    (`first_add`) and once its last ADD returned (`adds_done`), for `cpu_report`."""
    start: dict[str, Any] = {}
    add_pods = Lab.add_pods

    def counted(lab: Lab, pods: list[str], workers: int = 8) -> None:
        start["first_add"] = _cpu_now(lab)
        add_pods(lab, pods, workers)
        start["adds_done"] = _cpu_now(lab)

    Lab.add_pods = counted  # type: ignore[method-assign,assignment]
    try:
        yield start
    finally:
        Lab.add_pods = add_pods  # type: ignore[method-assign]


def random_pods() -> dict[str, Any]:
    # CPU is counted from the first ADD: the daemons' start (imports, first list) is left out.
    with _counted_from_first_add() as start, bench_lab("prand", random_manifest(100, 300), 3) as (lab, marks):
        figure = cold_add_seconds(lab, marks)
        print(f"100 pods / 300 links, 3 nodes: first ADD -> every link up {figure:.3f} s")
        cpu = cpu_report(lab, start)
        return {**report(lab, totals=True), "cpu_s": cpu, "figure_s": figure}


def many_links(nodes: int, links: int = 1500) -> dict[str, Any]:
    with bench_lab(f"pl{nodes}", two_pod_manifest(links), nodes) as (lab, marks):
        figure = cold_add_seconds(lab, marks)
        print(f"2 pods x {links} links, {nodes} node(s): first ADD -> every link up {figure:.3f} s")
        return {**report(lab), "figure_s": figure}


def isp_pods(routers: int, nodes: int = 3) -> dict[str, Any]:
    """The topology builder's seeded backbone (`lab_bench.isp`'s shape: `routers`, 1.2 links per
    router) on `nodes` nodes, SQLite: the phases per ADD and the CPU, to compare sizes."""
    from meshnet.topo.builder import build, render

    links = round(routers * 1.2)
    manifest = render(build(routers, links, seed=7))
    with _counted_from_first_add() as start, bench_lab(f"pisp{routers}", manifest, nodes) as (lab, marks):
        figure = cold_add_seconds(lab, marks)
        total = len(lab.status()["links"])
        print(f"ISP {routers} routers / {total} links, {nodes} nodes: first ADD -> every link up "
              f"{figure:.3f} s ({1000 * figure / total:.1f} ms per link)")
        cpu = cpu_report(lab, start)
        writes = lab.kubelet.record_writes
        print(f"state file: {writes} writes for {2 * len(lab.state.pods)} record changes")
        return {**report(lab, totals=True), "cpu_s": cpu, "figure_s": figure, "links": total,
                "state_file_writes": writes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--only", choices=["add", "random", "links1", "links2", "isp"])
    ap.add_argument("--isp-routers", type=int, default=200, metavar="N")
    args = ap.parse_args()
    if args.only == "isp":
        isp_pods(args.isp_routers)
        return 0
    if args.only in (None, "add"):
        hub_add(args.runs)
    if args.only in (None, "random"):
        random_pods()
    for nodes in (1, 2):
        if args.only in (None, f"links{nodes}"):
            many_links(nodes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
