"""Large peer batches (issue 14 item 4): a hub pod on node0 with a link to each of `spokes` pods on
node1, on a lab of 2 nodes (SQLite store).

Timed: the rollout (the lab's first ADD until every link is up: the spokes come up at once, each
asking node0 for the hub's end) and the hub's ADD (its DEL untimed before; from the ADD until every
link is up again: node1 builds all the far ends, in pages). Reported with the pages the hub's ADD
sent and the deadline errors in the daemons' logs (the figure is what matters; there is no floor).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.lab_bench import bench_lab, cold_add_seconds, links_all_up, peak_rss_mib
from meshnet.lab.cluster import Lab
from meshnet.lab.reports import daemon_events


def hub_manifest(spokes: int) -> str:
    """Pod `hub` (node0) with link uid i+1 to pod s<i> (node1) for each of `spokes` pods."""
    hub = ("apiVersion: networkop.co.uk/v1beta1\nkind: Topology\nmetadata: {name: hub}\nspec:\n  links:\n"
           + "".join(f"  - {{uid: {i + 1}, peer_pod: s{i}, local_intf: e{i}, peer_intf: eth1}}\n"
                     for i in range(spokes)))
    docs = [hub, "{kind: Pod, apiVersion: v1, metadata: {name: hub}, spec: {nodeName: node0}}\n"]
    for i in range(spokes):
        docs.append(f"apiVersion: networkop.co.uk/v1beta1\nkind: Topology\nmetadata: {{name: s{i}}}\nspec:\n"
                    f"  links:\n  - {{uid: {i + 1}, peer_pod: hub, local_intf: eth1, peer_intf: e{i}}}\n")
        docs.append(f"{{kind: Pod, apiVersion: v1, metadata: {{name: s{i}}}, spec: {{nodeName: node1}}}}\n")
    return "---\n".join(docs)


def _wait_up(lab: Lab, since: float, limit: float = 300.0) -> float:
    while not links_all_up(lab):
        if time.perf_counter() - since > limit:
            raise RuntimeError(f"links not up {limit:.0f} s after the hub's ADD")
        time.sleep(0.05)
    return time.perf_counter() - since


def hub(spokes: int = 200, runs: int = 3) -> dict[str, Any]:
    with bench_lab(f"bhub{spokes}", hub_manifest(spokes), 2) as (lab, marks):
        rollout = cold_add_seconds(lab, marks)
        samples = []
        for _ in range(runs):
            lab.del_pod("hub", remove_netns=False)
            time.sleep(1.0)  # node1's reactions to the DEL settle first
            t0 = time.perf_counter()
            rec = lab.add_pod("hub")
            if rec.state != "up":
                raise RuntimeError(f"hub ADD failed: {rec.error}")
            samples.append(_wait_up(lab, t0))
        sent = [e for e in daemon_events(lab.names, "node0")
                if e.get("event") == "peer-update" and e.get("links") == spokes]
        deadlines = sum(lab.names.log(n).read_text(errors="replace").count("DEADLINE_EXCEEDED")
                        for n in lab.state.nodes)
        rss = peak_rss_mib(lab)
    return {"spokes": spokes, "rollout_s": round(rollout, 3), "hub_add_s": round(statistics.median(samples), 3),
            "hub_add_samples_s": [round(s, 3) for s in samples], "pages": sent[-1].get("pages", 1) if sent else None,
            "deadline_errors": deadlines, "peak_rss_mib": rss, "ok": deadlines == 0}
