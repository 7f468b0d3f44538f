"""`pods_touched`: which of this node's pods a watch event concerns (pure: no store, no kernel)."""

from __future__ import annotations

from dataclasses import replace

from meshnet.daemon.reconciler import pods_touched
from meshnet.model import Link, LinkStatus, Topology, TopologyStatus

NODE = "node0"
NS = "default"


def alive(node: str = NODE, netns: str = "/var/run/netns/x", vtep: str = "198.51.100.1",
          block: int = 0, links: tuple[LinkStatus, ...] = ()) -> TopologyStatus:
    return TopologyStatus(src_ip=vtep, net_ns=netns, container_id="c", node=node, links=links, vni_block=block)


def pod(name: str, peer: str, status: TopologyStatus | None = None, namespace: str = NS) -> Topology:
    return Topology(name, namespace, (Link(1, peer, "eth1", "eth1"),), status or TopologyStatus())


def seen(*topos: Topology) -> dict[tuple[str, str], Topology]:
    return {t.key: t for t in topos}


def test_a_new_local_pod_is_touched_for_itself() -> None:
    a = pod("a", "b", alive())
    touched = pods_touched("ADDED", None, a, seen(a), NODE)
    assert touched.pods == {(NS, "a")} and touched.if_unsettled == frozenset()


def test_a_peer_coming_alive_touches_a_local_pod_waiting_for_it_only_if_still_unsettled() -> None:
    a = pod("a", "b", alive(links=(LinkStatus(1, "", "pending", "peer pod b is not up yet"),)))
    old_b = pod("b", "a")
    b = pod("b", "a", alive(node="node1", vtep="198.51.100.2"))
    touched = pods_touched("MODIFIED", old_b, b, seen(a, b), NODE)
    assert touched.pods == {(NS, "a")} and touched.if_unsettled == {(NS, "a")}
    assert touched.vtep_heard == "198.51.100.2"


def test_link_state_writes_touch_nobody() -> None:
    a = pod("a", "b", alive(links=(LinkStatus(1, "veth", "up", "", "eth1"),)))
    old_b = pod("b", "a", alive())
    b = replace(old_b, status=replace(old_b.status, links=(LinkStatus(1, "veth", "up", "", "eth1"),)))
    assert pods_touched("MODIFIED", old_b, b, seen(a, b), NODE).pods == frozenset()


def test_a_crashed_peer_touches_its_local_peers_but_a_clean_del_does_not() -> None:
    a = pod("a", "b", alive(links=(LinkStatus(1, "vxlan", "up", "", "eth1"),)))
    old_b = pod("b", "a", alive(node="node1", vtep="198.51.100.2"))
    crashed = pod("b", "a", TopologyStatus(plumbing_error="network namespace x vanished"))
    touched = pods_touched("MODIFIED", old_b, crashed, seen(a, crashed), NODE)
    assert touched.pods == {(NS, "a")} and touched.if_unsettled == frozenset()
    cleaned = pod("b", "a")
    assert pods_touched("MODIFIED", old_b, cleaned, seen(a, cleaned), NODE).pods == frozenset()


def test_a_block_recorded_elsewhere_touches_local_pods_of_other_namespaces_with_it() -> None:
    x = pod("x", "y", alive(block=7), namespace="other")
    a = pod("a", "b", alive(node="node1", vtep="198.51.100.2", block=7))
    assert pods_touched("ADDED", None, a, seen(x, a), NODE).pods == {("other", "x")}


def test_a_deleted_topology_hears_no_daemon() -> None:
    a = pod("a", "b", alive(node="node1", vtep="198.51.100.2"))
    touched = pods_touched("DELETED", a, a, seen(), NODE)
    assert touched.vtep_heard == "" and touched.pods == frozenset()
