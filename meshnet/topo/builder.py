"""A random connected topology of N routers: a random spanning tree plus extra random edges.

Addressing lives only inside our own namespaces and never touches the machine's networks:
- loopbacks: 192.0.2.<i>/32 for router i (TEST-NET-1) when N <= 254, otherwise 198.18.0.0/15
  (the benchmarking range) host i — router i always has the i-th address of its range;
- links: the k-th link (uid k) gets the k-th /30 of 100.64.0.0/10 (shared address space); the
  lower-numbered router takes the first host address.
The loopback goes into the pod annotation `meshnet.networkop.co.uk/loopback` so that routes can be
computed from the manifest alone. The output depends on the arguments only: same seed, same bytes.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Any

import yaml

from meshnet import naming
from meshnet.model import API_VERSION, KIND

LOOPBACK_ANNOTATION = "meshnet.networkop.co.uk/loopback"
TOPOLOGY_LABEL = "meshnet.networkop.co.uk/topology"
SMALL_LOOPBACKS = ipaddress.IPv4Network("192.0.2.0/24")
LARGE_LOOPBACKS = ipaddress.IPv4Network("198.18.0.0/15")
LINK_SPACE = ipaddress.IPv4Network("100.64.0.0/10")
DEFAULT_IMAGE = "alpine:3.20"
# Each link's uid selects its VXLAN VNI inside the namespace's block (meshnet.naming).
MAX_LINKS = naming.MAX_UID


class BuildError(ValueError):
    """Arguments that cannot make a topology; the message says which and why."""


@dataclass(frozen=True)
class Edge:
    uid: int
    a: int  # router numbers, a < b
    b: int


@dataclass(frozen=True)
class Router:
    number: int
    name: str
    loopback: ipaddress.IPv4Interface


@dataclass(frozen=True)
class BuiltTopology:
    routers: tuple[Router, ...]
    edges: tuple[Edge, ...]
    namespace: str
    prefix: str


def loopback_for(i: int, n: int) -> ipaddress.IPv4Interface:
    space = SMALL_LOOPBACKS if n <= 254 else LARGE_LOOPBACKS
    return ipaddress.IPv4Interface(f"{space.network_address + i}/32")


def link_subnet(uid: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((int(LINK_SPACE.network_address) + 4 * (uid - 1), 30))


def random_edges(n: int, m: int, seed: int) -> list[tuple[int, int]]:
    """`m` distinct edges over routers 1..n forming a connected graph (a random tree first)."""
    rng = random.Random(seed)
    edges: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    order = list(range(1, n + 1))
    rng.shuffle(order)
    for idx in range(1, n):
        # Attaching each router to a random earlier one gives a uniform-ish random tree.
        u, v = order[idx], order[rng.randrange(idx)]
        e = (min(u, v), max(u, v))
        edges.append(e)
        seen.add(e)
    extra = m - (n - 1)
    total = n * (n - 1) // 2
    if extra * 2 <= total - len(seen):
        # Sparse: rejection sampling is cheap and needs no list of all pairs.
        while extra:
            u, v = rng.randrange(1, n + 1), rng.randrange(1, n + 1)
            e = (min(u, v), max(u, v))
            if u == v or e in seen:
                continue
            edges.append(e)
            seen.add(e)
            extra -= 1
    else:
        rest = [(u, v) for u in range(1, n + 1) for v in range(u + 1, n + 1) if (u, v) not in seen]
        edges.extend(rng.sample(rest, extra))
    return edges


def build(n: int, links: int | None = None, *, seed: int = 0, prefix: str = "qrtr",
          namespace: str = "default") -> BuiltTopology:
    if n < 2:
        raise BuildError(f"N: {n} routers cannot make a topology (need at least 2)")
    m = n - 1 if links is None else links
    most = n * (n - 1) // 2
    if not n - 1 <= m <= most:
        raise BuildError(f"--links: {m} is outside {n - 1}..{most} for {n} routers "
                         f"({n - 1} makes a tree, {most} a full mesh)")
    if m > MAX_LINKS:
        raise BuildError(f"--links: {m} links exceed the {MAX_LINKS} uids a namespace has "
                         f"(each uid selects a VXLAN VNI of the namespace's block)")
    if n > LARGE_LOOPBACKS.num_addresses - 2:
        raise BuildError(f"N: {n} routers exceed the loopback range {LARGE_LOOPBACKS}")
    for what, value, why in (("--prefix", f"{prefix}-{n}", naming.k8s_name_problem(f"{prefix}-{n}")),
                             ("--namespace", namespace, naming.k8s_name_problem(namespace, label=True))):
        if why:
            raise BuildError(f"{what}: {value!r}: {why}")
    routers = tuple(Router(i, f"{prefix}-{i}", loopback_for(i, n)) for i in range(1, n + 1))
    edges = tuple(Edge(uid, a, b) for uid, (a, b) in enumerate(random_edges(n, m, seed), 1))
    return BuiltTopology(routers, edges, namespace, prefix)


def manifest_objects(topo: BuiltTopology, image: str = DEFAULT_IMAGE) -> list[dict[str, Any]]:
    """Pods then Topologies, as Kubernetes objects; interfaces eth1..ethK in uid order per pod."""
    names = {r.number: r.name for r in topo.routers}
    per_router: dict[int, list[dict[str, Any]]] = {r.number: [] for r in topo.routers}
    for e in topo.edges:
        net = link_subnet(e.uid)
        first, second = (f"{h}/{net.prefixlen}" for h in list(net.hosts())[:2])
        a_if = f"eth{len(per_router[e.a]) + 1}"
        b_if = f"eth{len(per_router[e.b]) + 1}"
        per_router[e.a].append({"uid": e.uid, "peer_pod": names[e.b], "local_intf": a_if, "peer_intf": b_if,
                                "local_ip": first, "peer_ip": second})
        per_router[e.b].append({"uid": e.uid, "peer_pod": names[e.a], "local_intf": b_if, "peer_intf": a_if,
                                "local_ip": second, "peer_ip": first})
    meta = {"namespace": topo.namespace}
    pods = [{
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": r.name, **meta, "labels": {TOPOLOGY_LABEL: topo.prefix},
                     "annotations": {LOOPBACK_ANNOTATION: str(r.loopback)}},
        "spec": {"containers": [{"name": "router", "image": image, "command": ["sleep", "infinity"],
                                 "securityContext": {"privileged": True}}],
                 "terminationGracePeriodSeconds": 0},
    } for r in topo.routers]
    topologies = [{"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": r.name, **meta},
                   "spec": {"links": per_router[r.number]}} for r in topo.routers]
    return pods + topologies


def render(topo: BuiltTopology, image: str = DEFAULT_IMAGE, seed: int | None = None) -> str:
    head = (f"# {len(topo.routers)} routers, {len(topo.edges)} links"
            + (f", seed {seed}" if seed is not None else "")
            + ": built by `meshnetctl topo build` (loopbacks in the pod annotation "
            + f"{LOOPBACK_ANNOTATION}).\n")
    body = yaml.safe_dump_all(manifest_objects(topo, image), sort_keys=False, explicit_start=True,
                              default_flow_style=False)
    return head + body
