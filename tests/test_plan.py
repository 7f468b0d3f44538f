"""Planner decisions, the remote end of a VXLAN, placement, and simulate_adds over every test manifest."""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from meshnet import naming
from meshnet.dryrun import every_link_plan, layout_for, place_pods, simulate_adds
from meshnet.model import Manifest, Topology, load_manifest, parse_manifest
from meshnet.plan import (
    VXLAN_OVERHEAD,
    MacvlanParentRefused,
    MacvlanPlan,
    NodeInfo,
    Pending,
    PodState,
    RemoteEnd,
    VethPlan,
    VxlanPlan,
    check_macvlan_parents,
    plan_link,
    plan_pod,
    plan_remote_end,
)

MANIFESTS = sorted(Path(__file__).parent.glob("*.yml"))
N1 = NodeInfo("n1", "198.51.100.1", "eth0", "mnt-n1", 9000)
N2 = NodeInfo("n2", "198.51.100.2", "eth0", "mnt-n2")


def topology(name: str, links: list[dict[str, object]], namespace: str = "lab") -> Topology:
    return Topology.from_api({"kind": "Topology", "metadata": {"name": name, "namespace": namespace},
                              "spec": {"links": links}})


R1 = topology("r1", [
    {"uid": 1, "peer_pod": "r2", "local_intf": "eth1", "peer_intf": "eth2", "local_ip": "10.0.0.1/30",
     "peer_ip": "10.0.0.2/30"},
    {"uid": 2, "peer_pod": "localhost", "local_intf": "eth5", "peer_intf": "eth0", "mtu": 1400},
    {"uid": 3, "peer_pod": "r3", "local_intf": "eth3", "peer_intf": "eth1"},
])
R2 = topology("r2", [
    {"uid": 1, "peer_pod": "r1", "local_intf": "eth2", "peer_intf": "eth1", "local_ip": "10.0.0.2/30",
     "peer_ip": "10.0.0.1/30"}])


def test_macvlan_needs_no_peer() -> None:
    p = plan_link(R1, R1.links[1], "pod-r1", N1, None)
    assert isinstance(p, MacvlanPlan)
    assert p == MacvlanPlan(2, p.local, "eth0", "mnt-n1", 1400)
    assert (p.local.netns, p.local.intf, p.local.ip) == ("pod-r1", "eth5", None)


@pytest.mark.parametrize(("parents", "allowed"), [
    (None, True),  # no operator in the picture (the dry-run's simulated cluster)
    (frozenset({"eth0"}), True),  # the underlay, listed by name
    (frozenset(), False),  # the daemon's default: no macvlan at all
    (frozenset({"*"}), False),  # any interface, but never the underlay unless named
    (frozenset({"*", "eth0"}), True),
    (frozenset({"eth1"}), False),
])
def test_macvlan_parent_is_an_operator_decision(parents: frozenset[str] | None, allowed: bool) -> None:
    node = replace(N1, macvlan_parents=parents)
    p = plan_link(R1, R1.links[1], "pod-r1", node, None)
    if allowed:
        assert isinstance(p, MacvlanPlan)
        check_macvlan_parents(R1, node)
        return
    # A running pod whose spec gains such a link: pending with the reason, never built.
    assert isinstance(p, Pending) and "host interface eth0" in p.reason and "--macvlan-parents" in p.reason
    with pytest.raises(MacvlanParentRefused, match=r"lab/r1 link uid 2: host interface eth0 .*MACVLAN_PARENTS"):
        check_macvlan_parents(R1, node)


def test_any_parent_but_the_underlay() -> None:
    node = replace(N1, uplink="bond0", macvlan_parents=frozenset({"*"}))
    assert isinstance(plan_link(R1, R1.links[1], "pod-r1", node, None), MacvlanPlan)
    with pytest.raises(MacvlanParentRefused, match="underlay"):
        check_macvlan_parents(R1, replace(node, uplink="eth0"))


@pytest.mark.parametrize("peer", [None, PodState("r2", False, "n1")])
def test_pending_when_peer_not_alive(peer: PodState | None) -> None:
    p = plan_link(R1, R1.links[0], "pod-r1", N1, peer)
    assert isinstance(p, Pending) and p.uid == 1 and p.peer_pod == "r2" and "not up" in p.reason


def test_veth_on_the_same_node() -> None:
    p = plan_link(R1, R1.links[0], "pod-r1", N1, PodState("r2", True, "n1", "198.51.100.1", "pod-r2"))
    assert isinstance(p, VethPlan)
    assert (p.a.netns, p.a.intf, str(p.a.ip)) == ("pod-r1", "eth1", "10.0.0.1/30")
    assert (p.b.netns, p.b.intf, str(p.b.ip)) == ("pod-r2", "eth2", "10.0.0.2/30")
    assert p.node_netns == "mnt-n1" and p.mtu == 1500  # veth MTU is not tied to the uplink


def test_vxlan_to_another_node_with_remote_end() -> None:
    p = plan_link(R1, R1.links[0], "pod-r1", N1, PodState("r2", True, "n2", "198.51.100.2", "pod-r2"))
    assert isinstance(p, tuple)
    vx, remote = p
    assert vx == VxlanPlan(1, vx.local, naming.vni("lab", 1), "198.51.100.2", "198.51.100.1", "eth0", "mnt-n1",
                           9000 - VXLAN_OVERHEAD)
    assert (vx.local.intf, str(vx.local.ip)) == ("eth1", "10.0.0.1/30")
    assert remote == RemoteEnd(1, "r2", "n2", "198.51.100.2")


def test_plan_pod_sorts_decisions() -> None:
    peers = {"r2": PodState("r2", True, "n2", "198.51.100.2", "pod-r2")}
    plan = plan_pod(R1, "pod-r1", N1, peers)
    assert [type(p).__name__ for p in plan.links] == ["VxlanPlan", "MacvlanPlan"]
    assert [p.uid for p in plan.pending] == [3]
    assert [r.uid for r in plan.remote] == [1]


def test_plan_remote_end_mirrors_the_caller() -> None:
    caller = PodState("r1", True, "n1", "198.51.100.1", "pod-r1")
    vx = plan_remote_end(R2, 1, "pod-r2", N2, caller)
    assert (vx.local.netns, vx.local.intf, str(vx.local.ip)) == ("pod-r2", "eth2", "10.0.0.2/30")
    assert (vx.remote_ip, vx.vtep_ip, vx.vni) == ("198.51.100.1", "198.51.100.2", naming.vni("lab", 1))
    assert vx.mtu == 1500 - VXLAN_OVERHEAD


def test_plan_remote_end_refuses_unknown_macvlan_or_same_node() -> None:
    caller = PodState("r1", True, "n1", "198.51.100.1", "pod-r1")
    with pytest.raises(KeyError):
        plan_remote_end(R2, 9, "pod-r2", N2, caller)
    with pytest.raises(KeyError):
        plan_remote_end(R1, 2, "pod-r1", N1, caller)
    with pytest.raises(ValueError, match="not a vxlan"):
        plan_remote_end(R2, 1, "pod-r2", N1, caller)  # caller on the same node: a veth


def _pods(*specs: tuple[str, str]) -> Manifest:
    docs = [{"kind": "Pod", "metadata": {"name": n}, "spec": {"nodeName": node} if node else {}} for n, node in specs]
    return parse_manifest(yaml.safe_dump_all(docs), "pods.yml")


def test_placement_round_robin_and_node_name() -> None:
    m = _pods(("a", ""), ("b", "node2"), ("c", ""), ("d", "node9"), ("e", "worker1"), ("f", "node0"))
    assert place_pods(m, 3) == {"default/a": 0, "default/b": 2, "default/c": 1, "default/d": 2, "default/e": 0,
                                "default/f": 0}
    assert set(place_pods(m, 1).values()) == {0}


def test_node_name_is_used_by_the_dry_run_layout() -> None:
    lab = layout_for(_pods(("a", "node1"), ("b", "node1")), 2, "mnt-x-")
    assert lab.layout.pod_node == {"default/a": "node1", "default/b": "node1"}


def _expected_ends(m: Manifest) -> set[tuple[str, str]]:
    """(pod, interface) of every link end the manifest asks for: both pods exist and describe the link."""
    pods = {p.name for p in m.pods}
    ends: set[tuple[str, str]] = set()
    for t in m.topologies:
        if t.name not in pods:
            continue
        for lnk in t.links:
            if lnk.is_macvlan or (lnk.peer_pod in pods and m.topology(t.namespace, lnk.peer_pod) is not None):
                ends.add((t.name, lnk.local_intf))
    return ends


@pytest.mark.parametrize("nodes", [1, 3])
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_simulate_adds_builds_each_link_exactly_once(path: Path, nodes: int) -> None:
    m = load_manifest(path)
    prefix = "mnd-"
    lab = layout_for(m, nodes, prefix)
    plans = every_link_plan(simulate_adds(m, lab.layout))
    ends = Counter((e.netns.removeprefix(prefix), e.intf) for p in plans for e in p.ends)
    assert all(n == 1 for n in ends.values()), ends
    assert set(ends) == _expected_ends(m)
    uids = Counter(p.uid for p in plans)
    node_of = {k.split("/")[1]: v for k, v in lab.layout.pod_node.items()}
    for p in plans:
        if isinstance(p, VethPlan):
            assert uids[p.uid] == 1
            assert node_of[p.a.netns.removeprefix(prefix)] == node_of[p.b.netns.removeprefix(prefix)]
        elif isinstance(p, VxlanPlan):
            assert uids[p.uid] == 2  # one end per node
            assert nodes > 1
            assert p.vni == naming.vni("default", p.uid) and p.vtep_ip != p.remote_ip
        else:
            assert uids[p.uid] == 1
    if nodes == 1:
        assert not any(isinstance(p, VxlanPlan) for p in plans)


def test_simulate_adds_on_three_nodes_uses_vxlan_across_nodes() -> None:
    m = load_manifest(Path(__file__).parent / "3node.yml")
    kinds = {p.kind for p in every_link_plan(simulate_adds(m, layout_for(m, 3, "mnd-").layout))}
    assert kinds == {"vxlan"}


def test_simulate_adds_reports_pending_links_of_early_pods() -> None:
    m = load_manifest(Path(__file__).parent / "3node.yml")
    steps = simulate_adds(m, layout_for(m, 1, "mnd-").layout)
    assert [(key, [p.uid for p in plan.pending]) for key, plan, _ in steps] == [
        ("default/r1", [1, 2]), ("default/r2", [3]), ("default/r3", [])]


def test_addresses_survive_planning() -> None:
    m = load_manifest(Path(__file__).parent / "macvlan.yml")
    plans = every_link_plan(simulate_adds(m, layout_for(m, 1, "mnd-").layout))
    mac = next(p for p in plans if isinstance(p, MacvlanPlan))
    assert mac.local.ip == ipaddress.ip_interface("172.17.0.199/16") and mac.parent == "eth0"
