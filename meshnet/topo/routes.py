"""Shortest-path static routes for a topology of routers, and installing them in a running lab.

The computation is pure: the routers are the Topologies, the edges their addressed pod-to-pod
links. A breadth-first search from every router gives, for every other router, the first link of
a shortest path (fewest hops; ties go to the lower uid, so the result is deterministic). Each
router then gets a route to every other router's loopback and to every link subnet it is not
attached to, via the peer address on that first link. Loopbacks come from the pod annotation the
builder writes (`meshnet.networkop.co.uk/loopback`); a manifest without them still gets routes to
every link subnet.
"""

from __future__ import annotations

import ipaddress
import os
import random
import subprocess
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from meshnet import watchdog
from meshnet.model import IPInterface, Link, ManifestError, Topology, yaml_documents
from meshnet.topo.builder import LOOPBACK_ANNOTATION

if TYPE_CHECKING:
    from meshnet.command import Command
    from meshnet.lab.cluster import Lab

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RouteError(Exception):
    """Routes could not be installed in a lab pod."""


class Route(NamedTuple):
    # A tuple, not a frozen dataclass: a 750-router plan makes ~1.2 million of them, and a frozen
    # dataclass's __init__ (object.__setattr__ per field) is most of the time spent making them.
    destination: IPNetwork
    via: IPAddress
    dev: str

    def argv(self) -> tuple[str, ...]:
        return ("route", "replace", str(self.destination), "via", str(self.via), "dev", self.dev)


@dataclass(frozen=True)
class RoutingPlan:
    routes: dict[str, tuple[Route, ...]]  # pod name -> its routes
    loopbacks: dict[str, IPInterface]
    unreachable: dict[str, tuple[str, ...]]  # pod name -> routers it has no path to


def loopbacks_from_text(text: str, source: str = "<manifest>") -> dict[str, IPInterface]:
    """Pod name -> loopback, from the `meshnet.networkop.co.uk/loopback` pod annotations."""
    out: dict[str, IPInterface] = {}
    try:
        docs = [d for d in yaml_documents(text) if isinstance(d, Mapping)]
    except yaml.YAMLError as e:
        raise ManifestError([f"{source}: not valid YAML: {e}"]) from e
    for doc in docs:
        meta = doc.get("metadata")
        if doc.get("kind") != "Pod" or not isinstance(meta, Mapping):
            continue
        value = (meta.get("annotations") or {}).get(LOOPBACK_ANNOTATION)
        if value is None:
            continue
        try:
            out[str(meta.get("name"))] = ipaddress.ip_interface(str(value))
        except ValueError as e:
            raise ManifestError([f"{source}: Pod {meta.get('name')}: metadata.annotations."
                                 f"{LOOPBACK_ANNOTATION}: {value!r} is not an address with prefix length"]) from e
    return out


def loopback_problems(text: str, source: str = "<manifest>") -> list[str]:
    """Every malformed loopback annotation, and every address two pods claim: what `validate`
    reports before a lab is brought up (else the routes fail after it)."""
    try:
        docs = [d for d in yaml_documents(text) if isinstance(d, Mapping)]
    except yaml.YAMLError:
        return []  # the manifest's own parse reports it
    problems: list[str] = []
    owner: dict[IPAddress, str] = {}
    for doc in docs:
        meta = doc.get("metadata")
        if doc.get("kind") != "Pod" or not isinstance(meta, Mapping):
            continue
        annotations = meta.get("annotations")
        value = annotations.get(LOOPBACK_ANNOTATION) if isinstance(annotations, Mapping) else None
        if value is None:
            continue
        pod = f"Pod {meta.get('namespace') or 'default'}/{meta.get('name')}"
        field = f"metadata.annotations.{LOOPBACK_ANNOTATION}"
        try:
            if not isinstance(value, str):
                raise ValueError
            address = ipaddress.ip_interface(value)
        except ValueError:
            problems.append(f"{source}: {pod}: {field}: {value!r} is not an address with prefix length "
                            "(e.g. 10.255.0.1/32)")
            continue
        if address.ip in owner:
            problems.append(f"{source}: {pod}: {field}: {value} is also the loopback of {owner[address.ip]}")
        else:
            owner[address.ip] = pod
    return problems


def read_loopbacks(path: str | Path) -> dict[str, IPInterface]:
    return loopbacks_from_text(Path(path).read_text(), str(path))


def adjacency(topologies: Iterable[Topology]) -> dict[str, list[tuple[str, Link]]]:
    """Router -> [(neighbour, link)] over links addressed on both ends, in uid order."""
    by_name = {t.name: t for t in topologies}
    adj: dict[str, list[tuple[str, Link]]] = {name: [] for name in sorted(by_name)}
    for name, t in by_name.items():
        for lnk in sorted(t.links, key=lambda x: x.uid):
            if lnk.is_macvlan or lnk.peer_pod not in by_name or lnk.local_ip is None or lnk.peer_ip is None:
                continue
            adj[name].append((lnk.peer_pod, lnk))
    return adj


def first_hops(adj: Mapping[str, Sequence[tuple[str, Link]]], source: str) -> tuple[dict[str, Link], dict[str, int]]:
    """BFS from `source`: for every reachable router, the first link of a shortest path and the hop count."""
    first: dict[str, Link] = {}
    dist = {source: 0}
    queue: deque[str] = deque([source])
    while queue:
        node = queue.popleft()
        for peer, lnk in adj.get(node, ()):
            if peer in dist:
                continue
            dist[peer] = dist[node] + 1
            first[peer] = lnk if node == source else first[node]
            queue.append(peer)
    return first, dist


def compute_routes(topologies: Iterable[Topology], loopbacks: Mapping[str, IPInterface]) -> RoutingPlan:
    """Every router's routes (see the module docstring), one BFS per router.

    The work is |routers| searches plus |routers| × (|routers| + |subnets|) route choices (a 750-
    router backbone: ~1.2 million routes), so everything that does not depend on the source is
    done once: routers become indices (in name order, so "lower name" is "lower index"), the
    destinations and subnets are sorted once, and each search fills flat lists instead of dicts.
    """
    topos = list(topologies)
    adj = adjacency(topos)
    names = list(adj)  # sorted by adjacency()
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    # A link as a first hop: (gateway, device), made once (`Link.peer_ip.ip` builds a new object).
    links = [[(index[peer], _hop(lnk)) for peer, lnk in adj[name]] for name in names]
    # Every addressed link subnet, with the routers attached to it (as indices, ascending).
    attached: dict[IPNetwork, set[int]] = {}
    for t in topos:
        for lnk in t.links:
            if lnk.local_ip is not None and not lnk.is_macvlan and t.name in index:
                attached.setdefault(lnk.local_ip.network, set()).add(index[t.name])
    subnets = [(net, sorted(attached[net])) for net in sorted(attached, key=lambda n: (n.version, n))]
    destinations = [(index[d], loopbacks[d].network)
                    for d in sorted((d for d in names if d in loopbacks),
                                    key=lambda d: (loopbacks[d].version, loopbacks[d], d))]
    routes: dict[str, tuple[Route, ...]] = {}
    unreachable: dict[str, tuple[str, ...]] = {}
    # A Route without the NamedTuple constructor's own Python call: ~1.2 million are made.
    new = tuple.__new__
    for src in range(n):
        first, dist = _first_hops(links, src, n)
        # The route through each of this router's links, made once per (destination, link).
        out: list[Route] = []
        for dst, net in destinations:
            hop = first[dst]
            if dst != src and hop is not None:
                out.append(new(Route, (net, *hop)))
        for net, ends in subnets:
            best = -1
            for e in ends:  # ascending: on equal distance the lower index (name) wins
                if e == src:
                    best = -2
                    break
                if dist[e] >= 0 and (best < 0 or dist[e] < dist[best]):
                    best = e
            if best == -2:
                continue  # connected: the kernel has the route with the address
            if best >= 0:
                hop = first[best]
                assert hop is not None
                out.append(new(Route, (net, *hop)))
        routes[names[src]] = tuple(out)
        missing = tuple(names[d] for d in range(n) if d != src and dist[d] < 0)
        if missing:
            unreachable[names[src]] = missing
    return RoutingPlan(routes, {k: v for k, v in loopbacks.items() if k in adj}, unreachable)


Hop = tuple[IPAddress, str]  # (via, dev)


def _hop(lnk: Link) -> Hop:
    assert lnk.peer_ip is not None  # adjacency() keeps addressed links only
    return lnk.peer_ip.ip, lnk.local_intf


def _first_hops(links: Sequence[Sequence[tuple[int, Hop]]], source: int,
                n: int) -> tuple[list[Hop | None], list[int]]:
    """`first_hops` over router indices: first hop (None: unreachable) and hop count (-1) per router."""
    first: list[Hop | None] = [None] * n
    dist = [-1] * n
    dist[source] = 0
    frontier: list[int] = []
    for peer, lnk in links[source]:
        if dist[peer] < 0:
            dist[peer] = 1
            first[peer] = lnk
            frontier.append(peer)
    # Level by level, each level in discovery order: the same tree as a FIFO queue gives.
    level = 1
    while frontier:
        level += 1
        nxt: list[int] = []
        for node in frontier:
            hop = first[node]
            for peer, _ in links[node]:
                if dist[peer] < 0:
                    dist[peer] = level
                    first[peer] = hop
                    nxt.append(peer)
        frontier = nxt
    return first, dist


def pod_commands(netns: str, pod: str, plan: RoutingPlan) -> list[Command]:
    """The `ip` commands (one batch) that give `pod` its loopback and routes."""
    from meshnet.command import Command

    cmds: list[Command] = []
    lo = plan.loopbacks.get(pod)
    if lo is not None:
        cmds.append(Command(netns, ("addr", "replace", str(lo), "dev", "lo")))
    cmds.extend(Command(netns, r.argv()) for r in plan.routes.get(pod, ()))
    return cmds


FORWARDING_KEYS = {4: "net/ipv4/ip_forward", 6: "net/ipv6/conf/all/forwarding"}


class RouteBatches:
    """Each pod's routes as the lines of one `ip -batch`, made from pieces checked once.

    A 750-router plan has ~1.2 million routes; one `Command` per route, each checked by the
    executor, cost more than the kernel took to install them (13 s to make, 11 s to check, under
    load). Every line is `route replace <destination> via <gateway> dev <device>`: the
    executor's checks run once on one command per distinct destination and one per distinct
    (gateway, device), so each piece of every line has passed them before anything runs."""

    def __init__(self, plan: RoutingPlan) -> None:
        from meshnet.command import Command
        from meshnet.executor import check_commands

        self.plan = plan
        # Keyed by the objects' ids (the plan holds them, so the ids stay theirs): hashing an
        # ipaddress object runs Python code, and there are two per route.
        dests: dict[int, str] = {}
        hops: dict[tuple[int, str], str] = {}
        probe_dests: list[str] = []
        probe_hops: list[tuple[str, str]] = []
        for routes in plan.routes.values():
            for dest, via, dev in routes:
                if id(dest) not in dests:
                    dests[id(dest)] = text = str(dest)
                    probe_dests.append(text)
                if (id(via), dev) not in hops:
                    hops[(id(via), dev)] = f" via {via} dev {dev}"
                    probe_hops.append((str(via), dev))
        checks = [Command(None, ("route", "replace", d, "via", probe_hops[0][0], "dev", probe_hops[0][1]))
                  for d in probe_dests] if probe_hops else []
        checks += [Command(None, ("route", "replace", probe_dests[0], "via", via, "dev", dev))
                   for via, dev in probe_hops]
        checks += [Command(None, ("addr", "replace", str(lo), "dev", "lo")) for lo in plan.loopbacks.values()]
        check_commands(checks, set_up=True)
        self._dests = dests
        self._hops = hops

    def lines(self, pod: str) -> list[str]:
        out = []
        lo = self.plan.loopbacks.get(pod)
        if lo is not None:
            out.append(f"addr replace {lo} dev lo")
        dests, hops = self._dests, self._hops
        out.extend(f"route replace {dests[id(dest)]}{hops[(id(via), dev)]}"
                   for dest, via, dev in self.plan.routes.get(pod, ()))
        return out


def _enable_forwarding(netns: str, versions: Iterable[int]) -> None:
    """Forwarding on in `netns`, written in-process: a thread enters the namespace (`setns` moves
    only the calling thread; /proc/sys/net is the namespace of the thread that opens it) and leaves
    again. `ip netns exec sysctl` per pod was a second process (and a remount of /sys) per pod."""
    from meshnet.netns_thread import in_netns

    def write() -> None:
        for v in versions:
            with open(f"/proc/sys/{FORWARDING_KEYS[v]}", "w") as fh:
                fh.write("1\n")

    in_netns(netns, write)


def install_routes(lab: Lab, workers: int = 0) -> dict[str, Any]:
    """Turn a lab that is up into a routed network: forwarding on, loopbacks on `lo`, static routes.

    Idempotent (`addr replace`, `route replace`), so it can run again after a pod restart. One
    `ip -n <pod> -batch` per pod (a batch line cannot change namespace), as many at once as the
    machine has cores (the kernel's work is most of it once the lines are made).
    """
    from meshnet import naming

    manifest = lab.manifest()
    plan = compute_routes(manifest.topologies, read_loopbacks(lab.state.manifest))
    batches = RouteBatches(plan)
    up = [rec for rec in lab.state.pods.values() if rec.state == "up"]
    for rec in up:
        why = naming.netns_problem(rec.netns)
        if why:
            raise RouteError(f"{rec.name}: namespace {rec.netns!r}: {why}")
    ipv6 = any(r.destination.version == 6 for rs in plan.routes.values() for r in rs)
    versions = (4, 6) if ipv6 else (4,)

    def one(rec: Any) -> int:
        try:
            _enable_forwarding(rec.netns, versions)
        except OSError as e:
            raise RouteError(f"{rec.name}: enabling forwarding failed: {e}") from e
        lines = batches.lines(rec.name)
        if lines:
            proc = watchdog.run(["ip", "-n", rec.netns, "-batch", "-"], input=("\n".join(lines) + "\n").encode(),
                                timeout=300)  # no exit polling (meshnet.watchdog)
            if proc.returncode != 0:
                raise RouteError(f"{rec.name}: installing routes failed: "
                                 f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
        return len(plan.routes.get(rec.name, ()))

    workers = workers or (os.cpu_count() or 1) + 1
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(up) or 1))) as pool:
        counts = list(pool.map(one, up))
    return {"pods": len(up), "routes": sum(counts), "loopbacks": sum(1 for r in up if r.name in plan.loopbacks),
            "unreachable": {k: list(v) for k, v in plan.unreachable.items()}}


def loopback_pairs(routers: Sequence[str], sample: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """Every ordered pair of distinct `routers` (sorted), or a seeded sample of `sample` of them,
    drawn without building the full list (750 routers have 561,750 pairs)."""
    names = sorted(routers)
    n = len(names)
    total = n * (n - 1)
    picks: Iterable[int] = range(total)
    if sample is not None and sample < total:
        picks = sorted(random.Random(seed).sample(range(total), sample))
    # Pair number k: source k // (n-1), destination the (k % (n-1))th of the others.
    return [(names[k // (n - 1)], names[(k % (n - 1)) + (1 if k % (n - 1) >= k // (n - 1) else 0)])
            for k in picks]


def ping_argv(netns: str, address: IPAddress) -> list[str]:
    return ["ip", "netns", "exec", netns, "ping", "-n", "-q", "-c", "1", "-W", "1", str(address)]


def ping_loopbacks(lab: Lab, sample: int | None = None, seed: int = 0, workers: int = 32,
                   attempts: int = 2) -> list[dict[str, Any]]:
    """Routed reachability: each pair's source pings the destination router's loopback (every
    pair of the lab's routers that are up and have one, or a seeded sample), `workers` at a time."""
    loopbacks = read_loopbacks(lab.state.manifest)
    up = {rec.name: rec.netns for rec in lab.state.pods.values() if rec.state == "up" and rec.name in loopbacks}
    pairs = loopback_pairs(list(up), sample, seed)

    def one(pair: tuple[str, str]) -> dict[str, Any]:
        src, dst = pair
        address = loopbacks[dst].ip
        ok = False
        for _ in range(attempts):  # the first packet of a path may wait for neighbour resolution
            proc = subprocess.run(ping_argv(up[src], address), capture_output=True, check=False, timeout=30)
            if proc.returncode == 0:
                ok = True
                break
        return {"from": src, "to": dst, "address": str(address), "ok": ok}

    if not pairs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pairs)))) as pool:
        return list(pool.map(one, pairs))
