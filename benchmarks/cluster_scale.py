"""What a cluster of many Topologies costs a pod ADD (issue 14, item 3).

    python -m benchmarks.cluster_scale            (as root)

The same lab twice, with the kube store against the project's API test server: a hub pod with
4 links ADDed again and again (DEL between) via the real shim, once in an otherwise empty cluster
and once with `topologies` Topologies in other namespaces (created straight in the API test
server's store, 3 links each, the way a busy cluster holds them). Reported: the ADD's median
latency in both (target: within 10 %), meshnetd's peak RSS (target: <= 150 MiB), the API requests
one ADD makes (no LIST), and what the daemon's cache holds per Topology.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

from benchmarks.lab_bench import bench_lab, hub_manifest, peak_rss_mib, settled
from meshnet.model import API_VERSION, PLURAL

NAMESPACES = 100


def other_topologies(count: int, namespaces: int = NAMESPACES) -> Iterator[dict[str, Any]]:
    """`count` Topologies spread over `namespaces` namespaces, in rings of 3 links per pod."""
    per_ns = max(1, count // namespaces)
    for i in range(count):
        ns, k = divmod(i, per_ns)
        names = [f"x{(k + d) % per_ns}" for d in (1, 2, 3)]
        links = [{"uid": j + 1 + 3 * k, "peer_pod": p, "local_intf": f"eth{j + 1}", "peer_intf": f"eth{j + 1}",
                  "local_ip": f"10.{j}.{k % 250}.1/24", "peer_ip": f"10.{j}.{k % 250}.2/24"}
                 for j, p in enumerate(names)]
        yield {"apiVersion": API_VERSION, "kind": "Topology",
               "metadata": {"name": f"x{k}", "namespace": f"scale-{ns % namespaces}"}, "spec": {"links": links}}


def _add_latency(topologies: int, runs: int) -> dict[str, Any]:
    from tests.kubeapi.server import KubeApiServer

    with KubeApiServer() as server:
        if topologies:
            server.create_objects(API_VERSION, PLURAL, other_topologies(topologies))
        with bench_lab("bscale", hub_manifest(4), 1, store="kube", kubeconfig=str(server.kubeconfig)) as (lab, _):
            time.sleep(1.0)  # the daemon's informer has listed (and the reconciler's first pass is done)
            samples: list[float] = []
            calls: list[int] = []
            lists: list[int] = []
            for _ in range(runs):
                lab.del_pod("h", remove_netns=False)
                # The DEL's reactions (its peers' statuses, gathered for a moment before they are
                # written) are over before the ADD is timed: in the full cluster they used to land
                # in the ADD's window, counted as its requests and taking the cores from it.
                settled(server, quiet=0.5)
                server.reset_counts()
                rec = lab.add_pod("h")
                if rec.state != "up":
                    raise RuntimeError(f"hub ADD failed: {rec.error}")
                samples.append(rec.seconds)
                # The lab's own reads are not the daemon's: count what the ADD itself asked (PUTs,
                # PATCHes, GETs of single objects) and every collection GET (a LIST) of anyone.
                requests = [r for r in server.requests if not r.query.get("watch")]
                lists.append(sum(1 for r in requests if r.method == "GET" and r.path.endswith(f"/{PLURAL}")))
                calls.append(len(requests))
            rss = peak_rss_mib(lab)
    return {"median_s": round(statistics.median(samples), 4), "samples_s": [round(s, 4) for s in samples],
            "requests_median": statistics.median(calls), "lists": sum(lists), "peak_rss_mib": rss}


def cache_bytes_per_topology(count: int = 2000) -> float:
    """Bytes the daemon's cache holds per Topology (3 links, empty status), measured with
    tracemalloc over parsing and caching `count` of them as the informer does."""
    import tracemalloc

    from meshnet.model import Topology
    from meshnet.store.cache import TopologyCache

    bodies = list(other_topologies(count))
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    cache = TopologyCache()
    cache.load(Topology.from_api(b) for b in bodies)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(cache) == count
    return round(total / count)


def measure(topologies: int = 10_000, runs: int = 15) -> dict[str, Any]:
    empty = _add_latency(0, runs)
    full = _add_latency(topologies, runs)
    ratio = full["median_s"] / empty["median_s"]
    return {"topologies": topologies, "empty": empty, "full": full, "latency_ratio": round(ratio, 3),
            "cache_bytes_per_topology": cache_bytes_per_topology(),
            "target": "ADD within 10 % of an empty cluster, peak RSS <= 150 MiB",
            "ok": ratio <= 1.10 and full["peak_rss_mib"] <= 150 and full["lists"] == 0}


def main() -> int:
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
