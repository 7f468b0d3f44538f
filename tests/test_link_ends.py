"""Link-end fields (ours): parsing with tc's units, refusal naming the field, planning, the `tc`
lines the templates render, and the in-place change commands. Pure: no kernel (see
test_links_kernel.py for the measurements)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest

from meshnet import naming
from meshnet.command import phases, script
from meshnet.ends import change_end, end_report, in_force
from meshnet.model import Impairments, ManifestError, check_peers, parse_topology
from meshnet.plan import Capabilities, Endpoint, NodeInfo, PodState, VethPlan, plan_link
from meshnet.render import render, render_impairments

NO_NETEM = Capabilities(netem=False)


def topo(name: str = "r1", **end: Any) -> dict[str, Any]:
    peer = "r2" if name == "r1" else "r1"
    return {"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": {"name": name},
            "spec": {"links": [{"uid": 4, "peer_pod": peer, "local_intf": "eth1", "peer_intf": "eth1", **end}]}}


def problem(**end: Any) -> str:
    with pytest.raises(ManifestError) as e:
        parse_topology(topo(**end), "wan.yml")
    assert len(e.value.problems) == 1, e.value.problems
    return e.value.problems[0]


@pytest.mark.parametrize(("raw", "parsed"), [
    ({"delay": "20ms"}, Impairments(delay=20_000)),
    ({"delay": "1.5ms", "jitter": "250us"}, Impairments(delay=1500, jitter=250)),
    ({"delay": "1s", "jitter": "10msec", "delay_correlation": "25%", "distribution": "pareto"},
     Impairments(delay=1_000_000, jitter=10_000, delay_correlation=25.0, distribution="pareto")),
    ({"loss": "0.5%", "loss_correlation": "10%"}, Impairments(loss=0.5, loss_correlation=10.0)),
    ({"rate": "10mbit"}, Impairments(rate=10_000_000)),
    ({"rate": "1.5gbit"}, Impairments(rate=1_500_000_000)),
    ({"rate": "125kbps"}, Impairments(rate=1_000_000)),  # tc: bps is bytes per second
    ({"corrupt": "0.1%", "duplicate": "1%"}, Impairments(corrupt=0.1, duplicate=1.0)),
    ({"delay": "10ms", "reorder": "25%", "reorder_correlation": "50%"},
     Impairments(delay=10_000, reorder=25.0, reorder_correlation=50.0)),
])
def test_impairments_parse_into_numbers_and_back(raw: dict[str, str], parsed: Impairments) -> None:
    t = parse_topology(topo(impairments=raw))
    assert t.links[0].impairments == parsed
    assert parse_topology(t.to_api()) == t  # what the store writes back reads the same


@pytest.mark.parametrize(("end", "fld", "words"), [
    ({"impairments": {"delay": "-5ms"}}, "impairments.delay", "negative"),
    ({"impairments": {"loss": "101%"}}, "impairments.loss", "more than 100%"),
    ({"impairments": {"delay": "20min"}}, "impairments.delay", "not a time"),
    ({"impairments": {"delay": "20"}}, "impairments.delay", "not a time"),
    ({"impairments": {"rate": "10furlongs"}}, "impairments.rate", "not a rate"),
    ({"impairments": {"rate": "0mbit"}}, "impairments.rate", "is zero"),
    ({"impairments": {"rate": "2tbit"}}, "impairments.rate", "outside 8kbit..1tbit"),
    ({"impairments": {"delay": "61s"}}, "impairments.delay", "more than 60s"),
    ({"impairments": {"loss": 1}}, "impairments.loss", "must be a string with a unit"),
    ({"impairments": {"jitter": "2ms"}}, "impairments.jitter", "needs delay"),
    ({"impairments": {"delay": "2ms", "distribution": "normal"}}, "impairments.distribution", "needs jitter"),
    ({"impairments": {"delay": "2ms", "jitter": "1ms", "distribution": "gauss"}}, "impairments.distribution",
     "not one of"),
    ({"impairments": {"bandwidth": "1mbit"}}, "impairments", "unknown field(s) bandwidth"),
    ({"impairments": ["20ms"]}, "impairments", "must be a mapping"),
    ({"state": "shut"}, "state", "not one of up, down"),
    ({"local_mac": "03:00:00:00:00:01"}, "local_mac", "multicast"),
    ({"local_mac": "02:00:00:00:01"}, "local_mac", "not a MAC address"),
    ({"local_ips": ["10.0.0.1"]}, "local_ips[0]", "no prefix length"),
    ({"local_ips": "10.0.0.1/24"}, "local_ips", "must be a list"),
    ({"local_ip": "10.0.0.1/24", "local_ips": ["10.0.0.1/24"]}, "local_ips[0]", "listed twice"),
])
def test_bad_end_values_are_refused_naming_object_uid_and_field(end: dict[str, Any], fld: str, words: str) -> None:
    msg = problem(**end)
    assert msg.startswith("wan.yml: Topology default/r1: link uid 4: "), msg
    assert f": {fld}:" in msg and words in msg, msg


def test_each_end_describes_itself_so_asymmetric_links_are_legal() -> None:
    a = parse_topology(topo("r1", impairments={"rate": "50mbit"}, state="down", local_mac="02:00:00:00:00:01"))
    b = parse_topology(topo("r2", impairments={"rate": "20mbit"}, local_ips=["2001:db8::2/64"]))
    check_peers([a, b])  # no "links must be mirrored" for per-end fields
    assert a.links[0].mirrored("r1").impairments is None and a.links[0].mirrored("r1").state == "up"


def test_a_veth_takes_the_far_ends_choices_from_the_peers_topology() -> None:
    a = parse_topology(topo("r1", local_ip="10.0.0.1/24", peer_ip="10.0.0.2/24"))
    b = parse_topology(topo("r2", local_ip="10.0.0.2/24", peer_ip="10.0.0.1/24", state="down",
                            local_mac="02:00:00:00:00:02", impairments={"rate": "20mbit"},
                            local_ips=["2001:db8::2/64"]))
    node = NodeInfo("n0", "198.51.100.1", "eth0")
    known = plan_link(a, a.links[0], "pa", node, PodState("r2", True, "n0", netns="pb", links=b.links))
    assert isinstance(known, VethPlan)
    assert known.b == Endpoint("pb", "eth1", ipaddress.ip_interface("10.0.0.2/24"), "02:00:00:00:00:02",
                               (ipaddress.ip_interface("2001:db8::2/64"),), "down", Impairments(rate=20_000_000))
    unknown = plan_link(a, a.links[0], "pa", node, PodState("r2", True, "n0", netns="pb"))
    assert isinstance(unknown, VethPlan)
    assert unknown.b.mac == naming.mac_address("default", "r2", "eth1") and unknown.b.impairments is None


END = Endpoint("pa", "eth1", ipaddress.ip_interface("10.0.0.1/24"))
FULL = Impairments(delay=20_000, jitter=2_000, distribution="normal", loss=1.0, rate=10_000_000)


@pytest.mark.parametrize(("imp", "caps", "lines"), [
    (Impairments(rate=10_000_000), Capabilities(),
     ["tc -n pa qdisc add dev eth1 root handle 1: tbf rate 10mbit burst 15140 latency 50ms"]),
    (Impairments(rate=1_000_000_000), Capabilities(),
     ["tc -n pa qdisc add dev eth1 root handle 1: tbf rate 1gbit burst 500000 latency 50ms"]),
    (Impairments(delay=20_000, loss=0.5, corrupt=0.1, duplicate=1.0, reorder=25.0, reorder_correlation=50.0),
     Capabilities(),
     ["tc -n pa qdisc add dev eth1 root handle 2: netem delay 20ms loss random 0.5% corrupt 0.1% duplicate 1% "
      "reorder 25% 50%"]),
    (FULL, Capabilities(),
     ["tc -n pa qdisc add dev eth1 root handle 3: tbf rate 10mbit burst 15140 latency 50ms",
      "tc -n pa qdisc add dev eth1 parent 3:1 handle 30: netem delay 20ms 2ms distribution normal loss random 1%"]),
    (FULL, NO_NETEM, ["tc -n pa qdisc add dev eth1 root handle 1: tbf rate 10mbit burst 15140 latency 50ms"]),
    (Impairments(delay=20_000), NO_NETEM, []),
])
def test_tc_lines_per_shape_of_the_qdisc_tree(imp: Impairments, caps: Capabilities, lines: list[str]) -> None:
    assert [c.shell() for c in render_impairments(replace(END, impairments=imp), 4, "add", caps)] == lines
    assert all(c.tool == "tc" and c.uid == 4 for c in render_impairments(replace(END, impairments=imp), 4, "add"))


def test_an_add_gets_one_tc_batch_per_namespace_beside_its_ip_batch_and_a_del_none() -> None:
    plan = VethPlan(4, replace(END, impairments=FULL), Endpoint("pb", "eth1", None, impairments=FULL), "node", 1500)
    groups = phases(render([plan], "add"))
    assert [[(ns, b[0].tool) for ns, b in p] for p in groups] == [
        [("node", "ip")], [("pa", "ip"), ("pb", "ip"), ("pa", "tc"), ("pb", "tc")]]
    assert not any(c.tool == "tc" for c in render([plan], "del"))
    assert "tc -n pa -force -batch - <<'EOF' || echo" in script(render([plan], "add"))
    assert {c.argv[1] for c in render([plan], "update") if c.tool == "tc"} == {"replace"}


def test_reports_name_what_this_node_cannot_apply() -> None:
    end = replace(END, impairments=FULL)
    assert in_force(FULL, Capabilities()) == (FULL, ())
    report = end_report(end, 4, NO_NETEM)
    assert report.unavailable == ("delay", "jitter", "distribution", "loss")
    assert report.to_api() == {"uid": 4, "intf": "eth1", "state": "up", "impairments": {"rate": "10mbit"},
                               "unavailable": ["delay", "jitter", "distribution", "loss"]}
    assert end_report(replace(END, impairments=Impairments(delay=1000)), 4, NO_NETEM).impairments is None


def test_live_changes_touch_only_what_differs() -> None:
    v6 = ipaddress.ip_interface("2001:db8::1/64")
    newer = replace(END, ips=(v6,), state="down", impairments=Impairments(rate=1_000_000))
    assert [c.shell() for c in change_end(END, newer, 4)] == [
        "ip -n pa addr add 2001:db8::1/64 dev eth1 nodad",
        "ip -n pa link set eth1 down",
        "tc -n pa qdisc replace dev eth1 root handle 1: tbf rate 1mbit burst 15140 latency 50ms",
    ]
    assert [c.shell() for c in change_end(newer, replace(newer, ips=(), impairments=None), 4)] == [
        "ip -n pa addr del 2001:db8::1/64 dev eth1",
        "tc -n pa qdisc del dev eth1 root",
    ]
    assert change_end(newer, newer, 4) == []
    # Without netem a delay change changes nothing this node applies: no commands at all.
    slow = replace(END, impairments=Impairments(delay=1000, rate=1_000_000))
    assert change_end(slow, replace(slow, impairments=Impairments(delay=9000, rate=1_000_000)), 4, NO_NETEM) == []
    with pytest.raises(ValueError, match="keeps the interface"):
        change_end(END, replace(END, intf="eth2"), 4)


def test_one_chosen_mac_on_two_ends_of_a_pod_is_refused() -> None:
    t = topo(local_mac="02:00:00:00:00:01")
    t["spec"]["links"].append({"uid": 5, "peer_pod": "r3", "local_intf": "eth2", "peer_intf": "eth1",
                               "local_mac": "02:00:00:00:00:01"})
    with pytest.raises(ManifestError) as e:
        parse_topology(t, "wan.yml")
    assert e.value.problems == ["wan.yml: Topology default/r1: link uid 5: local_mac: 02:00:00:00:00:01 is "
                                "already used by link uid 4 of this pod"]
