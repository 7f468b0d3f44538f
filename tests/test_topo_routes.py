"""Shortest-path static routes: pure computation, and the routed 20-router lab on 3 nodes."""

from __future__ import annotations

import ipaddress
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshnet.cli import main
from meshnet.model import ManifestError, Topology, load_manifest, parse_manifest
from meshnet.topo.builder import build, render
from meshnet.topo.graph import graph_data
from meshnet.topo.routes import (
    Route,
    RouteBatches,
    RoutingPlan,
    adjacency,
    compute_routes,
    first_hops,
    install_routes,
    loopback_pairs,
    loopbacks_from_text,
    ping_loopbacks,
    pod_commands,
    read_loopbacks,
)
from tests.labkit import lab_up

TESTS = Path(__file__).resolve().parent

LINE = """
apiVersion: v1
kind: Pod
metadata: {name: a, annotations: {meshnet.networkop.co.uk/loopback: 192.0.2.1/32}}
---
apiVersion: v1
kind: Pod
metadata: {name: b, annotations: {meshnet.networkop.co.uk/loopback: 192.0.2.2/32}}
---
apiVersion: v1
kind: Pod
metadata: {name: c, annotations: {meshnet.networkop.co.uk/loopback: 192.0.2.3/32}}
---
kind: Topology
metadata: {name: a}
spec: {links: [{uid: 1, peer_pod: b, local_intf: eth1, peer_intf: eth1, local_ip: 10.0.1.1/30, peer_ip: 10.0.1.2/30}]}
---
kind: Topology
metadata: {name: b}
spec: {links: [{uid: 1, peer_pod: a, local_intf: eth1, peer_intf: eth1, local_ip: 10.0.1.2/30, peer_ip: 10.0.1.1/30},
               {uid: 2, peer_pod: c, local_intf: eth2, peer_intf: eth1, local_ip: 10.0.2.1/30, peer_ip: 10.0.2.2/30}]}
---
kind: Topology
metadata: {name: c}
spec: {links: [{uid: 2, peer_pod: b, local_intf: eth1, peer_intf: eth2, local_ip: 10.0.2.2/30, peer_ip: 10.0.2.1/30}]}
"""


def _plan(text: str) -> RoutingPlan:
    return compute_routes(parse_manifest(text).topologies, loopbacks_from_text(text))


def test_a_line_routes_through_the_middle() -> None:
    plan = _plan(LINE)
    net, ip = ipaddress.ip_network, ipaddress.ip_address
    assert plan.routes["a"] == (Route(net("192.0.2.2/32"), ip("10.0.1.2"), "eth1"),
                                Route(net("192.0.2.3/32"), ip("10.0.1.2"), "eth1"),
                                Route(net("10.0.2.0/30"), ip("10.0.1.2"), "eth1"))
    # b is attached to both subnets: loopbacks only.
    assert plan.routes["b"] == (Route(net("192.0.2.1/32"), ip("10.0.1.1"), "eth1"),
                                Route(net("192.0.2.3/32"), ip("10.0.2.2"), "eth2"))
    assert plan.unreachable == {}
    assert [c.argv for c in pod_commands("ns-a", "a", plan)][:2] == [
        ("addr", "replace", "192.0.2.1/32", "dev", "lo"),
        ("route", "replace", "192.0.2.2/32", "via", "10.0.1.2", "dev", "eth1")]



def test_route_batches_are_the_commands_of_each_pod_as_batch_lines() -> None:
    """`install_routes` hands `ip -batch` lines made from checked pieces: the same as the commands."""
    text = render(build(30, 40, seed=5))
    plan = _plan(text)
    batches = RouteBatches(plan)
    for pod in plan.routes:
        assert batches.lines(pod) == [" ".join(c.argv) for c in pod_commands("ns", pod, plan)]


def test_route_batches_refuse_a_bad_device_before_anything_runs() -> None:
    plan = _plan(LINE)
    bad = RoutingPlan({"a": (Route(ipaddress.ip_network("192.0.2.2/32"), ipaddress.ip_address("10.0.1.2"),
                                   "eth1\nlink del eth0"),)}, plan.loopbacks, {})
    with pytest.raises(Exception, match="eth1"):
        RouteBatches(bad)

PAIR = """
kind: Pod
metadata: {name: a, annotations: {meshnet.networkop.co.uk/loopback: 192.0.2.1/32}}
---
kind: Pod
metadata: {name: b, annotations: {meshnet.networkop.co.uk/loopback: 192.0.2.2/32}}
---
kind: Topology
metadata: {name: a}
spec: {links: [{uid: 7, peer_pod: b, local_intf: eth1, peer_intf: eth2, local_ip: 10.0.7.1/30, peer_ip: 10.0.7.2/30},
               {uid: 3, peer_pod: b, local_intf: eth2, peer_intf: eth1, local_ip: 10.0.3.1/30, peer_ip: 10.0.3.2/30}]}
---
kind: Topology
metadata: {name: b}
spec: {links: [{uid: 7, peer_pod: a, local_intf: eth2, peer_intf: eth1, local_ip: 10.0.7.2/30, peer_ip: 10.0.7.1/30},
               {uid: 3, peer_pod: a, local_intf: eth1, peer_intf: eth2, local_ip: 10.0.3.2/30, peer_ip: 10.0.3.1/30}]}
"""


def test_parallel_links_pick_the_lowest_uid() -> None:
    plan = _plan(PAIR)
    assert plan.routes["a"] == (Route(ipaddress.ip_network("192.0.2.2/32"), ipaddress.ip_address("10.0.3.2"), "eth2"),)
    assert plan.routes["b"] == (Route(ipaddress.ip_network("192.0.2.1/32"), ipaddress.ip_address("10.0.3.1"), "eth1"),)


def test_disconnected_routers_are_reported_not_routed() -> None:
    topos = list(parse_manifest(LINE).topologies)
    # Cut c off: without the b-c link c is unreachable from a and b, and a and b from c.
    cut = [Topology(t.name, t.namespace, tuple(lnk for lnk in t.links if lnk.uid != 2)) for t in topos]
    plan = compute_routes(cut, loopbacks_from_text(LINE))
    assert plan.unreachable == {"a": ("c",), "b": ("c",), "c": ("a", "b")}
    assert plan.routes["c"] == ()
    assert plan.routes["a"] == (Route(ipaddress.ip_network("192.0.2.2/32"), ipaddress.ip_address("10.0.1.2"), "eth1"),)


def test_loopback_annotation_must_be_an_address() -> None:
    with pytest.raises(ManifestError, match="loopback: 'nope' is not an address"):
        loopbacks_from_text(LINE.replace("192.0.2.1/32", "nope"))


def _reference_routes(topos: list[Topology], loopbacks: dict[str, ipaddress.IPv4Interface]) -> RoutingPlan:
    """The plain statement of the rule compute_routes optimises: a BFS with a queue from every
    router, destinations and subnets sorted per router, the nearest attached router (then lowest
    name) for a subnet."""
    adj = adjacency(topos)
    subnets: dict[ipaddress.IPv4Network, set[str]] = {}
    for t in topos:
        for lnk in t.links:
            if lnk.local_ip is not None and not lnk.is_macvlan:
                subnets.setdefault(lnk.local_ip.network, set()).add(t.name)  # type: ignore[arg-type]
    routes: dict[str, tuple[Route, ...]] = {}
    unreachable: dict[str, tuple[str, ...]] = {}
    for src in adj:
        first, dist = first_hops(adj, src)
        out = []
        for dst in sorted((d for d in adj if d in loopbacks), key=lambda d: (loopbacks[d], d)):
            if dst != src and dst in first:
                out.append(Route(loopbacks[dst].network, first[dst].peer_ip.ip, first[dst].local_intf))  # type: ignore[union-attr]
        for net in sorted(subnets):
            if src in subnets[net]:
                continue
            near = sorted((dist[e], e) for e in subnets[net] if e in first)
            if near:
                lnk = first[near[0][1]]
                out.append(Route(net, lnk.peer_ip.ip, lnk.local_intf))  # type: ignore[union-attr]
        routes[src] = tuple(out)
        missing = tuple(d for d in sorted(adj) if d != src and d not in first)
        if missing:
            unreachable[src] = missing
    return RoutingPlan(routes, {k: v for k, v in loopbacks.items() if k in adj}, unreachable)


@pytest.mark.parametrize(("n", "m", "seed"), [(120, 160, 7), (60, 59, 3), (40, 300, 11)])
def test_routes_equal_the_reference_on_mid_size_graphs(n: int, m: int, seed: int) -> None:
    text = render(build(n, m, seed=seed))
    topos = list(parse_manifest(text).topologies)
    loopbacks = loopbacks_from_text(text)
    assert compute_routes(topos, loopbacks) == _reference_routes(topos, loopbacks)  # type: ignore[arg-type]
    # Cut into pieces (every router's links with uid % 7 == 0 dropped): unreachable parts agree too.
    cut = [Topology(t.name, t.namespace, tuple(lnk for lnk in t.links if lnk.uid % 7)) for t in topos]
    got = compute_routes(cut, loopbacks)
    assert got == _reference_routes(cut, loopbacks)  # type: ignore[arg-type]
    if m == n - 1:
        assert got.unreachable  # a tree cut anywhere falls apart: the comparison covered that case


@pytest.mark.parametrize(("n", "m", "seed"), [(20, 24, 20), (40, 80, 2), (15, 14, 8)])
def test_forwarding_along_the_routes_reaches_every_loopback_on_a_shortest_path(n: int, m: int, seed: int) -> None:
    text = render(build(n, m, seed=seed))
    manifest = parse_manifest(text)
    plan = _plan(text)
    # Which router owns each address (interface ends and loopbacks), and each router's connected subnets.
    owner = {lnk.local_ip.ip: t.name for t in manifest.topologies for lnk in t.links if lnk.local_ip}
    connected = {t.name: {lnk.local_ip.network: lnk for lnk in t.links if lnk.local_ip} for t in manifest.topologies}
    adj = adjacency(manifest.topologies)
    hops_to = {src: first_hops(adj, src)[1] for src in plan.routes}

    def lookup(router: str, dst: ipaddress.IPv4Address) -> str:
        for net, lnk in connected[router].items():
            if dst in net:
                assert lnk.peer_ip is not None
                return owner[lnk.peer_ip.ip]
        best = max((r for r in plan.routes[router] if dst in r.destination), key=lambda r: r.destination.prefixlen)
        assert any(lnk.local_intf == best.dev for lnk in connected[router].values())
        return owner[best.via]

    for src in plan.routes:
        for dst, lo in plan.loopbacks.items():
            if dst == src:
                continue
            here, hops = src, 0
            while here != dst:
                here, hops = lookup(here, lo.ip), hops + 1  # type: ignore[arg-type]
                assert hops <= n
            assert hops == hops_to[src][dst], f"{src}->{dst}: {hops} hops, shortest is {hops_to[src][dst]}"
            # The reply comes from the first link's address: the way back to that subnet works too.
            back = next(iter(connected[src]))
            here, hops = dst, 0
            while back not in connected[here]:
                here, hops = lookup(here, back.network_address + 1), hops + 1  # type: ignore[arg-type]
                assert hops <= n


def test_cli_routes_prints_every_pods_routes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topo", "routes", str(TESTS / "20node.yml")]) == 0
    out = capsys.readouterr().out
    assert out.count("# qrtr-") == 20
    # 19 loopbacks + (24 subnets - the pod's own) per pod.
    per_pod = [len(block.strip().splitlines()) - 1 for block in out.split("# qrtr-")[1:]]
    links = {t.name: len(t.links) for t in load_manifest(TESTS / "20node.yml").topologies}
    assert sorted(per_pod) == sorted(19 + 24 - k for k in links.values())


def _ping(ns: str, address: str, attempts: int = 3) -> bool:
    for _ in range(attempts):
        proc = subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c1", "-W1", address],
                              capture_output=True, check=False, timeout=10)
        if proc.returncode == 0:
            return True
    return False


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_routed_20_router_lab_on_3_nodes_every_loopback_answers_every_router(tmp_path: Path) -> None:
    manifest = TESTS / "20node.yml"
    loopbacks = read_loopbacks(manifest)
    with lab_up(tmp_path, manifest, nodes=3) as lab:
        status = lab.status()
        assert {lk["state"] for lk in status["links"]} == {"up"}
        assert {lk["kind"] for lk in status["links"]} == {"veth", "vxlan"}  # both link kinds get routed over
        summary = install_routes(lab)
        assert summary["pods"] == 20 and summary["loopbacks"] == 20 and summary["unreachable"] == {}
        pods = {name: rec.netns for name, rec in lab.state.pods.items()}
        # In every namespace: forwarding on, the loopback on lo, every planned route in the kernel.
        plan = compute_routes(lab.manifest().topologies, loopbacks)
        for name, ns in pods.items():
            fwd = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_forward"],
                                 capture_output=True, text=True, check=True).stdout.strip()
            assert fwd == "1", name
            kernel = subprocess.run(["ip", "-n", ns, "route", "show", "proto", "boot"], capture_output=True,
                                    text=True, check=True).stdout
            got = {ipaddress.ip_network(line.split()[0]) for line in kernel.splitlines()}
            assert got >= {r.destination for r in plan.routes[name]}, name
            lo = subprocess.run(["ip", "-n", ns, "addr", "show", "dev", "lo"], capture_output=True, text=True,
                                check=True).stdout
            assert str(loopbacks[name]) in lo, name
        checks = [(src, dst) for src in pods for dst in pods if src != dst]
        assert len(checks) == 20 * 19
        with ThreadPoolExecutor(max_workers=24) as pool:
            results = list(pool.map(lambda c: _ping(pods[c[0]], str(loopbacks[c[1]].ip)), checks))
        failed = [f"{src}->{dst} ({loopbacks[dst].ip})" for (src, dst), ok in zip(checks, results, strict=True)
                  if not ok]
        assert failed == []
        # Running it again changes nothing and breaks nothing (replace, not add).
        assert install_routes(lab)["routes"] == summary["routes"]
        assert _ping(pods["qrtr-1"], str(loopbacks["qrtr-20"].ip))
        # `lab ping --loopbacks`: every pair, or a seeded sample; a missing route is a failure.
        every = ping_loopbacks(lab)
        assert len(every) == 380 and all(r["ok"] for r in every)
        sampled = ping_loopbacks(lab, sample=25, seed=3)
        assert len({(r["from"], r["to"]) for r in sampled}) == 25 and all(r["ok"] for r in sampled)
        assert [(r["from"], r["to"]) for r in ping_loopbacks(lab, sample=25, seed=3)] == \
               [(r["from"], r["to"]) for r in sampled]
        subprocess.run(["ip", "-n", pods["qrtr-1"], "route", "del", str(loopbacks["qrtr-20"].network)], check=True)
        broken = [(r["from"], r["to"]) for r in ping_loopbacks(lab) if not r["ok"]]
        assert broken == [("qrtr-1", "qrtr-20")]
        install_routes(lab)
        # The live graph colours every link by the lab's state.
        data = graph_data(lab.manifest(), loopbacks, status["links"])
        assert sorted(lk["state"] for lk in data["links"]) == ["up"] * 24


def test_validate_checks_loopback_annotations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yml"
    good.write_text(render(build(6, 7, seed=1)))
    assert main(["validate", str(good)]) == 0
    bad = tmp_path / "bad.yml"
    text = good.read_text()
    lo1, lo2, lo3 = (str(loopbacks_from_text(text)[f"qrtr-{i}"]) for i in (1, 2, 3))
    # Router 2 claims router 1's loopback; router 3's is not an address.
    bad.write_text(text.replace(f"loopback: {lo2}", f"loopback: {lo1}").replace(f"loopback: {lo3}", "loopback: 10.1.2"))
    capsys.readouterr()
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"Pod default/qrtr-2: metadata.annotations.meshnet.networkop.co.uk/loopback: {lo1} is also the " \
           "loopback of Pod default/qrtr-1" in err
    assert "Pod default/qrtr-3: metadata.annotations.meshnet.networkop.co.uk/loopback: '10.1.2' is not an " \
           "address" in err


def test_loopback_pairs_are_every_ordered_pair_or_a_seeded_sample() -> None:
    names = [f"r{i}" for i in range(7)]
    every = loopback_pairs(names)
    assert every == [(a, b) for a in names for b in names if a != b]
    sample = loopback_pairs(names, sample=10, seed=4)
    assert len(set(sample)) == 10 and set(sample) <= set(every)
    assert sample == loopback_pairs(list(reversed(names)), sample=10, seed=4)  # the seed decides, not the order
    assert loopback_pairs(names, sample=100) == every
    assert len(loopback_pairs([f"r{i}" for i in range(750)], sample=50, seed=1)) == 50
