"""Model validation: one test per rule; each message names the file, the object, the link uid and the field."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshnet.model import (
    Link,
    ManifestError,
    Topology,
    TopologyStatus,
    check_peers,
    load_manifest,
    parse_manifest,
    parse_topology,
)

SRC = "lab.yml"


def link(uid: Any = 1, peer: str = "r2", local: Any = "eth1", remote: Any = "eth1", **extra: Any) -> dict[str, Any]:
    return {"uid": uid, "peer_pod": peer, "local_intf": local, "peer_intf": remote, **extra}


def topo(name: str, *links: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": meta,
            "spec": {"links": list(links)}}


def manifest(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs)


def problems(*docs: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as e:
        parse_manifest(manifest(*docs), SRC)
    return e.value.problems


def one_problem(*docs: dict[str, Any]) -> str:
    found = problems(*docs)
    assert len(found) == 1, found
    return found[0]


def assert_names(msg: str, obj: str, uid: int | None, fld: str) -> None:
    assert msg.startswith(f"{SRC}: "), msg
    assert obj in msg, msg
    if uid is not None:
        assert f"link uid {uid}" in msg, msg
    assert f": {fld}:" in msg, msg


# --- interface names ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "a" * 16, "eth 1", "eth\t1", "eth1\n", "eth/1", "eth:1", "eth'1", 'eth"1',
                                 "eth#1", ".", "..", "e;1", "$(x)", "-eth1", "e`x`"])
@pytest.mark.parametrize("fld", ["local_intf", "peer_intf"])
def test_bad_interface_name_is_refused(bad: str, fld: str) -> None:
    lnk = link(3)
    lnk[fld] = bad
    msg = one_problem(topo("r1", lnk))
    assert_names(msg, "Topology default/r1", 3, fld)


def test_interface_name_of_15_chars_is_accepted() -> None:
    m = parse_manifest(manifest(topo("r1", link(1, local="a" * 15, remote="e1-1.x_y"))), SRC)
    assert m.topologies[0].links[0].local_intf == "a" * 15


def test_interface_name_must_be_a_string() -> None:
    assert_names(one_problem(topo("r1", link(1, local=5))), "Topology default/r1", 1, "local_intf")


def test_eth0_is_reserved_locally() -> None:
    msg = one_problem(topo("r1", link(2, local="eth0")))
    assert_names(msg, "Topology default/r1", 2, "local_intf")
    assert "reserved" in msg


def test_eth0_is_reserved_on_the_peer_pod() -> None:
    assert_names(one_problem(topo("r1", link(2, remote="eth0"))), "Topology default/r1", 2, "peer_intf")


# --- addresses ---------------------------------------------------------------------------------

def test_ipv4_and_ipv6_cidrs_are_parsed() -> None:
    m = parse_manifest(manifest(
        topo("r1", link(1, local_ip="12.12.12.1/24", peer_ip="12.12.12.2/24"),
             link(2, peer="r3", local="eth2", local_ip="2001:db8::1/64", peer_ip="2001:db8::2/64"))), SRC)
    l1, l2 = m.topologies[0].links
    assert l1.local_ip == ipaddress.IPv4Interface("12.12.12.1/24")
    assert l2.peer_ip == ipaddress.IPv6Interface("2001:db8::2/64")


def test_a_links_addresses_are_one_object_in_both_pods_topologies() -> None:
    """meshnetd caches every Topology: each link's two addresses are parsed in both of its pods'
    (issue 14 item 6), and the same text gives the same object while one is held."""
    r1 = parse_topology(topo("r1", link(1, local_ip="10.9.0.1/30", peer_ip="10.9.0.2/30")))
    r2 = parse_topology(topo("r2", link(1, peer="r1", local_ip="10.9.0.2/30", peer_ip="10.9.0.1/30")))
    assert r1.links[0].local_ip is r2.links[0].peer_ip
    assert r1.links[0].peer_ip is r2.links[0].local_ip
    assert r1.links[0].local_ip == ipaddress.IPv4Interface("10.9.0.1/30")


@pytest.mark.parametrize("fld", ["local_ip", "peer_ip"])
@pytest.mark.parametrize(("bad", "why"), [
    ("12.12.12.1", "no prefix length"),
    ("12.12.12.300/24", "not an IPv4 or IPv6"),
    ("12.12.12.1/33", "not an IPv4 or IPv6"),
    ("2001:db8::1/129", "not an IPv4 or IPv6"),
    ("fe80::1%eth0/64", "scope id"),
    (1234, "CIDR string"),
])
def test_bad_address_is_refused(fld: str, bad: Any, why: str) -> None:
    msg = one_problem(topo("r1", link(4, **{fld: bad})))
    assert_names(msg, "Topology default/r1", 4, fld)
    assert why in msg


def test_mixed_address_families_are_refused() -> None:
    msg = one_problem(topo("r1", link(1, local_ip="10.0.0.1/30", peer_ip="2001:db8::2/64")))
    assert_names(msg, "Topology default/r1", 1, "peer_ip")


# --- uid ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, True, "1", "1; rm", 1.5, 4096, None])
def test_bad_uid_is_refused(bad: Any) -> None:
    msg = one_problem(topo("r1", link(bad)))
    assert "Topology default/r1" in msg and ": uid:" in msg and msg.startswith(SRC)
    if isinstance(bad, int) and not isinstance(bad, bool):
        assert f"link uid {bad}" in msg  # a well-typed uid names the link by it
    else:
        assert "spec.links[0]" in msg  # otherwise by position


@pytest.mark.parametrize("good", [0, 4095])
def test_uid_bounds_are_accepted(good: int) -> None:
    assert parse_manifest(manifest(topo("r1", link(good))), SRC).topologies[0].links[0].uid == good


def test_required_fields() -> None:
    raw = link(1)
    del raw["peer_intf"]
    assert_names(one_problem(topo("r1", raw)), "Topology default/r1", 1, "peer_intf")


def test_mtu_range() -> None:
    assert_names(one_problem(topo("r1", link(1, mtu=9))), "Topology default/r1", 1, "mtu")
    assert parse_manifest(manifest(topo("r1", link(1, mtu=9000))), SRC).topologies[0].links[0].mtu == 9000


# --- links between pods -------------------------------------------------------------------------

def test_mirrored_links_are_accepted() -> None:
    m = parse_manifest(manifest(
        topo("r1", link(1, "r2", "eth1", "eth2", local_ip="10.0.0.1/30", peer_ip="10.0.0.2/30")),
        topo("r2", link(1, "r1", "eth2", "eth1", local_ip="10.0.0.2/30", peer_ip="10.0.0.1/30"))), SRC)
    assert len(m.topologies) == 2


@pytest.mark.parametrize(("fld", "theirs"), [
    ("local_intf", {"local": "eth3"}),
    ("peer_intf", {"remote": "eth9"}),
    ("local_ip", {"local_ip": "10.0.0.3/30", "peer_ip": "10.0.0.1/30"}),
    ("peer_ip", {"local_ip": "10.0.0.2/30", "peer_ip": "10.0.0.5/30"}),
])
def test_links_must_be_mirrored(fld: str, theirs: dict[str, Any]) -> None:
    mine = link(7, "r2", "eth1", "eth2", local_ip="10.0.0.1/30", peer_ip="10.0.0.2/30")
    kw: dict[str, Any] = {"local": "eth2", "remote": "eth1", "local_ip": "10.0.0.2/30", "peer_ip": "10.0.0.1/30"}
    kw.update(theirs)
    msg = one_problem(topo("r1", mine), topo("r2", link(7, "r1", **kw)))
    assert_names(msg, "Topology default/r1", 7, fld)
    assert "mirrored" in msg


def test_peer_without_the_link_is_refused() -> None:
    msg = one_problem(topo("r1", link(1)), topo("r2", link(2, "r3")))
    assert_names(msg, "Topology default/r1", 1, "peer_pod")


def test_peer_pointing_elsewhere_is_refused() -> None:
    msg = one_problem(topo("r1", link(1, "r2")), topo("r2", link(1, "r3")))
    assert msg.startswith(SRC) and "link uid 1" in msg and ": uid:" in msg


def test_uid_reused_by_two_links_whose_peers_have_no_topology() -> None:
    msg = one_problem(topo("r1", link(1, "r2")), topo("r3", link(1, "r4")))
    assert_names(msg, "namespace default", 1, "uid")
    assert "r1→r2" in msg and "r3→r4" in msg


def test_uid_reused_by_three_pods() -> None:
    msg = one_problem(topo("r1", link(1, "r2")), topo("r2", link(1, "r1")), topo("r3", link(1, "r4")))
    assert_names(msg, "namespace default", 1, "uid")


def test_same_uid_in_two_namespaces_is_fine() -> None:
    m = parse_manifest(manifest(topo("r1", link(1, "r2"), namespace="a"), topo("r3", link(1, "r4"), namespace="b")),
                       SRC)
    assert len(m.topologies) == 2


def test_uid_used_twice_in_one_pod() -> None:
    msg = one_problem(topo("r1", link(1, "r2"), link(1, "r3", "eth2")))
    assert_names(msg, "Topology default/r1", 1, "uid")


def test_interface_used_twice_in_one_pod() -> None:
    msg = one_problem(topo("r1", link(1, "r2"), link(2, "r3", "eth1")))
    assert_names(msg, "Topology default/r1", 2, "local_intf")


def test_self_loop_is_refused() -> None:
    assert_names(one_problem(topo("r1", link(1, "r1", "eth1", "eth2"))), "Topology default/r1", 1, "peer_pod")


def test_missing_peer_topology_is_legal() -> None:
    m = parse_manifest(manifest(topo("r1", link(1, "nobody"))), SRC)
    assert m.topologies[0].links[0].peer_pod == "nobody"


def test_bad_peer_pod_name() -> None:
    assert_names(one_problem(topo("r1", link(1, "R2 netns x"))), "Topology default/r1", 1, "peer_pod")


# --- macvlan ------------------------------------------------------------------------------------

def test_macvlan_takes_host_parent_eth0() -> None:
    m = parse_manifest(manifest(topo("r1", link(2, "localhost", "eth2", "eth0", local_ip="172.17.0.199/16"))), SRC)
    lnk = m.topologies[0].links[0]
    assert lnk.is_macvlan and lnk.peer_intf == "eth0"


def test_macvlan_parent_name_is_checked() -> None:
    msg = one_problem(topo("r1", link(2, "localhost", "eth2", "eth0;reboot")))
    assert_names(msg, "Topology default/r1", 2, "peer_intf")


def test_macvlan_uid_shared_with_a_pod_link_is_refused() -> None:
    msg = one_problem(topo("r1", link(2, "localhost", "eth2", "eth0")), topo("r3", link(2, "r4")))
    assert_names(msg, "namespace default", 2, "uid")


def test_macvlan_local_eth0_still_reserved() -> None:
    assert_names(one_problem(topo("r1", link(2, "localhost", "eth0", "eth0"))), "Topology default/r1", 2,
                 "local_intf")


# --- objects ------------------------------------------------------------------------------------

def test_unknown_link_field_is_refused() -> None:
    msg = one_problem(topo("r1", link(1, command="reboot")))
    assert msg.startswith(f"{SRC}: Topology default/r1: link uid 1: unknown field(s) command "), msg


def test_bad_object_names() -> None:
    assert any("metadata.name" in p for p in problems(topo("R1;x", link(1))))
    assert any("metadata.namespace" in p for p in problems(topo("r1", link(1), namespace="a b")))


def test_wrong_api_version() -> None:
    raw = topo("r1", link(1))
    raw["apiVersion"] = "networkop.co.uk/v1"
    assert_names(one_problem(raw), "Topology default/r1", None, "apiVersion")


def test_links_must_be_a_list() -> None:
    raw = topo("r1")
    raw["spec"] = {"links": "eth1"}
    assert_names(one_problem(raw), "Topology default/r1", None, "spec.links")


def test_every_problem_is_reported_at_once() -> None:
    assert len(problems(topo("r1", link(1, local="eth 1"), link(2, "r3", "eth2", local_ip="x/1")))) == 2


def test_object_defined_twice() -> None:
    assert any("defined twice" in p for p in problems(topo("r1", link(1)), topo("r1", link(1))))


def test_statefulset_expands_to_its_pods() -> None:
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "r1", "namespace": "lab"},
           "spec": {"replicas": 3}}
    one = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "r2"}, "spec": {}}
    m = parse_manifest(manifest(sts, one), SRC)
    assert [(p.namespace, p.name) for p in m.pods] == [("lab", "r1-0"), ("lab", "r1-1"), ("lab", "r1-2"),
                                                       ("default", "r2-0")]


def test_statefulset_bad_replicas() -> None:
    sts = {"kind": "StatefulSet", "metadata": {"name": "r1"}, "spec": {"replicas": "1; rm"}}
    assert "spec.replicas" in one_problem(sts)


def test_list_kind_is_unpacked() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "r1"}, "spec": {"nodeName": "node2"}}
    m = parse_manifest(manifest({"apiVersion": "v1", "kind": "List", "items": [topo("r1", link(1)), pod]}), SRC)
    assert [t.name for t in m.topologies] == ["r1"] and m.pods[0].node_name == "node2"


def test_other_kinds_are_ignored() -> None:
    m = parse_manifest(manifest({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}), SRC)
    assert m.topologies == () and m.pods == ()


def test_invalid_yaml_names_the_file() -> None:
    with pytest.raises(ManifestError, match=r"^lab\.yml: not valid YAML"):
        parse_manifest("a: [", SRC)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "missing.yml")


def test_api_round_trip_keeps_spec_and_status() -> None:
    raw = topo("r1", link(1, local_ip="10.0.0.1/30", peer_ip="10.0.0.2/30", mtu=9000), namespace="lab")
    raw["metadata"]["resourceVersion"] = "42"
    raw["status"] = {"src_ip": "198.51.100.1", "net_ns": "/run/netns/x", "container_id": "c1", "node": "n1",
                     "skipped": [{"pod_name": "r2", "link_id": 1}],
                     "links": [{"uid": 1, "kind": "veth", "state": "up"}], "vni_block": 220}
    t = Topology.from_api(raw, SRC)
    assert t.key == ("lab", "r1") and t.resource_version == "42" and t.status.alive
    assert t.to_api() == raw
    assert parse_topology(t.to_api()) == t


@pytest.mark.parametrize("value", [None, "x", True, [1], 3.5])
def test_a_vni_block_that_is_not_a_number_reads_as_none_recorded(value: object) -> None:
    raw = topo("r1", link(1))
    raw["status"] = {"vni_block": value}
    assert Topology.from_api(raw, SRC).status.vni_block == 0


def test_status_alive_needs_src_ip_and_net_ns() -> None:
    assert not TopologyStatus(src_ip="198.51.100.1").alive
    assert TopologyStatus(src_ip="198.51.100.1", net_ns="/x").alive


def test_mirrored_link() -> None:
    lnk = Link(1, "r2", "eth1", "eth2", ipaddress.ip_interface("10.0.0.1/30"), None, 1400)
    assert lnk.mirrored("r1") == Link(1, "r1", "eth2", "eth1", None, ipaddress.ip_interface("10.0.0.1/30"), 1400)


def test_check_peers_directly() -> None:
    a = Topology.from_api(topo("r1", link(1, "r2")), SRC)
    b = Topology.from_api(topo("r2", link(1, "r1", remote="eth5")), SRC)
    with pytest.raises(ManifestError, match="link uid 1: peer_intf"):
        check_peers([a, b])


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.glob("*.yml")), ids=lambda p: p.name)
def test_every_test_manifest_is_valid(path: Path) -> None:
    m = load_manifest(path)
    assert m.topologies and m.pods
