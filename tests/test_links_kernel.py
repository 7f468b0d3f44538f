"""Link ends on the real kernel: rate limits, down/up, dual-stack right after ADD, chosen MACs,
live changes in place and netem (capability-gated: the test output says which case ran).

Everything goes the way the daemon goes: model → plan → render (templates) → Executor, in
`mnt-` namespaces that are always removed. Underlays only in 198.51.100.0/24.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from meshnet import naming
from meshnet.dryrun import infra_commands
from meshnet.ends import change_end, end_report, plan_reports
from meshnet.executor import Executor
from meshnet.model import Impairments, parse_topology
from meshnet.plan import Capabilities, Endpoint, MacvlanPlan, NodeInfo, VethPlan, VxlanPlan, endpoint
from meshnet.render import render
from tests.netns import ip, netns_set, unique_prefix

pytestmark = pytest.mark.root

V4A, V4B = ipaddress.ip_interface("10.77.0.1/24"), ipaddress.ip_interface("10.77.0.2/24")
V6A, V6B = ipaddress.ip_interface("2001:db8:77::1/64"), ipaddress.ip_interface("2001:db8:77::2/64")


def veth(a: str, b: str, *, a_end: dict[str, Any] | None = None, b_end: dict[str, Any] | None = None) -> VethPlan:
    return VethPlan(1, Endpoint(a, "eth1", V4A, **(a_end or {})), Endpoint(b, "eth1", V4B, **(b_end or {})), None, 1500)


def link_json(ns: str, intf: str) -> dict[str, Any]:
    return dict(json.loads(ip("-n", ns, "-j", "-d", "addr", "show", "dev", intf).stdout)[0])


def qdiscs(ns: str, intf: str) -> list[dict[str, Any]]:
    r = subprocess.run(["tc", "-n", ns, "-j", "qdisc", "show", "dev", intf], capture_output=True, text=True,
                       check=True, timeout=10)
    return list(json.loads(r.stdout or "[]"))


def pings(ns: str, target: str, count: int = 1, wait: float = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2",
                           "-W", str(wait), target], capture_output=True, text=True, timeout=30, check=False)


def rtt_ms(ns: str, target: str, count: int = 5) -> float:
    r = pings(ns, target, count)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    assert m, r.stdout
    return float(m.group(1))


def transfer_seconds(src_ns: str, dst_ns: str, dst_ip: str, size: int) -> float:
    """Send `size` bytes over TCP from `src_ns` to `dst_ns`; seconds until the receiver had them all.

    A tiny stdlib sender and receiver, each a Python process inside its namespace, bounded in time.
    """
    receiver = ("import socket,sys,time\n"
                "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                f"s.bind(({dst_ip!r},5201)); s.listen(1); print('ready',flush=True)\n"
                "c,_=s.accept(); n=0; t=None\n"
                f"while n<{size}:\n"
                " d=c.recv(65536)\n"
                " if not d: break\n"
                " t=t or time.monotonic(); n+=len(d)\n"
                "print(n, time.monotonic()-t, flush=True)\n")
    sender = ("import socket\n"
              f"c=socket.create_connection(({dst_ip!r},5201),timeout=10); c.sendall(b'x'*{size}); c.close()\n")
    rx = subprocess.Popen(["ip", "netns", "exec", dst_ns, "python3", "-c", receiver], stdout=subprocess.PIPE,
                          text=True)
    try:
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", src_ns, "python3", "-c", sender], check=True, timeout=20)
        out, _ = rx.communicate(timeout=20)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    got, seconds = out.split()
    assert int(got) == size
    return float(seconds)


@pytest.fixture(scope="module")
def executor() -> Executor:
    return Executor()


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    with netns_set(2) as (a, b):
        yield a, b


def test_netem_capability_is_detected_once(executor: Executor, capsys: pytest.CaptureFixture[str]) -> None:
    caps = executor.capabilities()
    probe = subprocess.run(["unshare", "-n", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                           capture_output=True, text=True, timeout=10, check=False)
    assert caps.netem == (probe.returncode == 0), probe.stderr
    assert executor.capabilities() is caps  # cached: probed once per process
    with capsys.disabled():
        print(f"\n[netem capability] this kernel {'HAS' if caps.netem else 'LACKS'} netem")


def test_rate_limit_caps_a_bounded_transfer(executor: Executor, pair: tuple[str, str]) -> None:
    a, b = pair
    size = 1_000_000
    executor.apply(render([veth(a, b)], "add"))
    free = transfer_seconds(a, b, str(V4B.ip), size)
    limited = veth(a, b, a_end={"impairments": Impairments(rate=8_000_000)})
    executor.apply(change_end(veth(a, b).a, limited.a, 1))
    capped = transfer_seconds(a, b, str(V4B.ip), size)
    # 8 Mbit/s = 1 MB/s: about a second (TCP/IP headers add ~3 %, the tbf burst saves a little).
    assert 0.8 <= capped <= 1.6, f"1 MB over 8mbit took {capped:.2f}s (unlimited: {free:.3f}s)"
    assert free < capped / 3, f"unlimited {free:.3f}s vs limited {capped:.2f}s: the limit did nothing?"
    (root,) = qdiscs(a, "eth1")
    assert (root["kind"], root["handle"]) == ("tbf", "1:")


def test_rate_applies_at_add_in_one_tc_batch_per_namespace(executor: Executor, pair: tuple[str, str]) -> None:
    a, b = pair
    plan = veth(a, b, a_end={"impairments": Impairments(rate=8_000_000)},
                b_end={"impairments": Impairments(rate=16_000_000)})
    before = len(executor.journal.entries)
    executor.apply(render([plan], "add", executor.capabilities()))
    tc_batches = [e for e in executor.journal.entries[before:] if e.get("tool") == "tc"]
    assert sorted(e["netns"] for e in tc_batches) == sorted([a, b])
    assert [q["kind"] for q in qdiscs(a, "eth1")] == ["tbf"] and [q["kind"] for q in qdiscs(b, "eth1")] == ["tbf"]
    assert qdiscs(b, "eth1")[0]["options"]["rate"] == 2_000_000  # bytes/s, as the kernel keeps it


def test_down_takes_carrier_from_the_far_end_and_up_restores_it(executor: Executor, pair: tuple[str, str]) -> None:
    a, b = pair
    up = veth(a, b)
    executor.apply(render([up], "add"))
    assert pings(a, str(V4B.ip)).returncode == 0
    index = link_json(a, "eth1")["ifindex"]
    down = replace(up.a, state="down")
    executor.apply(change_end(up.a, down, 1))
    far = link_json(b, "eth1")
    assert "NO-CARRIER" in far["flags"] and far["operstate"] != "UP", far
    assert pings(a, str(V4B.ip)).returncode != 0 and pings(b, str(V4A.ip)).returncode != 0
    executor.apply(change_end(down, up.a, 1))
    assert "NO-CARRIER" not in link_json(b, "eth1")["flags"]
    assert pings(a, str(V4B.ip), wait=2).returncode == 0 and pings(b, str(V4A.ip)).returncode == 0
    assert link_json(a, "eth1")["ifindex"] == index  # changed in place, never made again


def test_an_end_declared_down_comes_up_down(executor: Executor, pair: tuple[str, str]) -> None:
    a, b = pair
    executor.apply(render([veth(a, b, a_end={"state": "down"})], "add"))
    assert "UP" not in link_json(a, "eth1")["flags"]
    assert "NO-CARRIER" in link_json(b, "eth1")["flags"]


def test_ipv4_and_ipv6_answer_right_after_the_add(executor: Executor, pair: tuple[str, str]) -> None:
    a, b = pair
    plan = veth(a, b, a_end={"ips": (V6A,)}, b_end={"ips": (V6B,)})
    executor.apply(render([plan], "add"))
    # No sleep. nodad: no address is tentative, so it can be bound and used as a source at once
    # (without nodad, DAD keeps it tentative for 1-2 s and bind() fails).
    probe = ("import socket\n"
             "s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
             f"s.bind(({str(V6A.ip)!r}, 0))\n")
    subprocess.run(["ip", "netns", "exec", a, "python3", "-c", probe], check=True, timeout=10)
    v6 = [x for x in link_json(b, "eth1")["addr_info"] if x["local"] == str(V6B.ip)]
    assert v6 and not v6[0].get("tentative") and not v6[0].get("dadfailed"), v6
    # The first neighbour solicitation can still race the kernel's join of the solicited-node
    # group (done by a work item just after `link set up`); one NDP retransmit (1 s) covers it.
    six = pings(a, str(V6B.ip), wait=3)
    four = pings(a, str(V4B.ip))
    assert (four.returncode, six.returncode) == (0, 0), four.stdout + six.stdout + six.stderr


def test_a_chosen_mac_is_the_one_in_the_kernel(executor: Executor, pair: tuple[str, str]) -> None:
    a, b = pair
    spec = {"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": {"name": "r1"},
            "spec": {"links": [{"uid": 1, "peer_pod": "r2", "local_intf": "eth1", "peer_intf": "eth1",
                                "local_mac": "02:AB:CD:00:00:01"}]}}
    lnk = parse_topology(spec).links[0]
    plan = VethPlan(1, endpoint(a, "default", "r1", lnk), Endpoint(b, "eth1", None), None, 1500)
    executor.apply(render([plan], "add"))
    assert link_json(a, "eth1")["address"] == "02:ab:cd:00:00:01"
    assert link_json(a, "eth1")["address"] != naming.mac_address("default", "r1", "eth1")


def test_live_address_and_impairment_changes_keep_the_interface(executor: Executor, pair: tuple[str, str]) -> None:
    a, b = pair
    plan = veth(a, b, a_end={"ips": (V6A,), "impairments": Impairments(rate=8_000_000)})
    caps = executor.capabilities()
    executor.apply(render([plan], "add", caps))
    index = link_json(a, "eth1")["ifindex"]
    newer = replace(plan.a, ips=(ipaddress.ip_interface("2001:db8:78::1/64"),),
                    impairments=Impairments(rate=4_000_000))
    executor.apply(change_end(plan.a, newer, 1, caps))
    addrs = {x["local"] for x in link_json(a, "eth1")["addr_info"]}
    assert "2001:db8:78::1" in addrs and str(V6A.ip) not in addrs and str(V4A.ip) in addrs
    assert qdiscs(a, "eth1")[0]["options"]["rate"] == 500_000
    cleared = replace(newer, impairments=None)
    executor.apply(change_end(newer, cleared, 1, caps))
    assert all(q["kind"] != "tbf" for q in qdiscs(a, "eth1"))
    assert change_end(cleared, cleared, 1, caps) == []
    assert link_json(a, "eth1")["ifindex"] == index


def test_delay_without_netem_still_brings_the_link_up(executor: Executor, pair: tuple[str, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Where netem is missing (this project's machines) the link comes up, the rate applies and the
    report names what is unavailable. Forced here with Capabilities(netem=False) so it always runs."""
    a, b = pair
    caps = executor.capabilities() if not executor.capabilities().netem else Capabilities(netem=False)
    imp = Impairments(delay=20_000, jitter=2_000, loss=1.0, rate=8_000_000)
    plan = veth(a, b, a_end={"impairments": imp})
    executor.apply(render([plan], "add", caps))
    assert pings(a, str(V4B.ip)).returncode == 0
    assert [q["kind"] for q in qdiscs(a, "eth1")] == ["tbf"]
    report = plan_reports(plan, caps)[0]
    assert report.unavailable == ("delay", "jitter", "loss")
    assert report.impairments == Impairments(rate=8_000_000)
    assert "delay, jitter, loss unavailable on this node" in report.message
    assert report.to_api()["impairments"] == {"rate": "8mbit"}
    with capsys.disabled():
        print(f"\n[netem capability] no-netem path ran ({'real' if not executor.capabilities().netem else 'forced'})")


def test_netem_delay_and_loss_where_the_kernel_has_netem(executor: Executor, pair: tuple[str, str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    caps = executor.capabilities()
    if not caps.netem:
        with capsys.disabled():
            print("\n[netem capability] netem ABSENT: delay/loss measurements skipped (capability-gated)")
        pytest.skip("capability-gated: this kernel has no netem qdisc")
    a, b = pair
    plan = veth(a, b)
    executor.apply(render([plan], "add", caps))
    base = rtt_ms(a, str(V4B.ip))
    delayed = replace(plan.a, impairments=Impairments(delay=20_000))
    executor.apply(change_end(plan.a, delayed, 1, caps))
    assert 15 <= rtt_ms(a, str(V4B.ip)) - base <= 40
    lossy = replace(delayed, impairments=Impairments(loss=100.0))
    executor.apply(change_end(delayed, lossy, 1, caps))
    assert pings(a, str(V4B.ip), count=5).returncode != 0
    with capsys.disabled():
        print("\n[netem capability] netem PRESENT: 20ms delay and 100% loss measured")


def test_vxlan_down_stops_traffic_both_ways(executor: Executor) -> None:
    """Two emulated nodes on an underlay; a vxlan end taken down stops traffic in both directions.
    The far end keeps its carrier: a vxlan device has no link-level signal from its remote, so a
    pulled cable shows there as silence, not as NO-CARRIER (see docs/links.md)."""
    prefix = unique_prefix()
    nodes = (NodeInfo("n0", "198.51.100.10", "eth0", f"{prefix}n0"),
             NodeInfo("n1", "198.51.100.11", "eth0", f"{prefix}n1"))
    try:
        executor.run_sequence(infra_commands(prefix, nodes))
        with netns_set(2, prefix) as (pa, pb):
            ea, eb = Endpoint(pa, "eth1", V4A), Endpoint(pb, "eth1", V4B)
            left = VxlanPlan(1, ea, 4096 * 7 + 1, "198.51.100.11", "198.51.100.10", "eth0", nodes[0].netns, 1450)
            right = VxlanPlan(1, eb, 4096 * 7 + 1, "198.51.100.10", "198.51.100.11", "eth0", nodes[1].netns, 1450)
            executor.apply(render([left, right], "add"))
            assert pings(pa, str(V4B.ip), wait=2).returncode == 0
            executor.apply(change_end(ea, replace(ea, state="down"), 1))
            assert pings(pa, str(V4B.ip)).returncode != 0 and pings(pb, str(V4A.ip)).returncode != 0
            executor.apply(change_end(replace(ea, state="down"), ea, 1))
            assert pings(pb, str(V4A.ip), wait=2).returncode == 0
    finally:
        for name in (f"{prefix}n0", f"{prefix}n1", f"{prefix}ul", f"{prefix}ext"):
            ip("netns", "del", name, check=False)


def test_macvlan_down_stops_traffic(executor: Executor) -> None:
    with netns_set(3) as (node, pod, other):
        # The parent: one end of a veth inside the node namespace (this kernel has no dummy driver).
        ip("-n", node, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
        ip("-n", node, "link", "set", "ul1", "up")
        ip("-n", node, "link", "set", "ul0", "up")
        mine = MacvlanPlan(1, Endpoint(pod, "eth1", V4A), "ul0", node, None)
        theirs = MacvlanPlan(2, Endpoint(other, "eth1", V4B), "ul0", node, None)
        executor.apply(render([mine, theirs], "add"))
        assert pings(other, str(V4A.ip), wait=2).returncode == 0
        executor.apply(change_end(mine.local, replace(mine.local, state="down"), 1))
        assert pings(other, str(V4A.ip)).returncode != 0 and pings(pod, str(V4B.ip)).returncode != 0
        executor.apply(change_end(replace(mine.local, state="down"), mine.local, 1))
        assert pings(other, str(V4A.ip), wait=2).returncode == 0


def test_end_report_of_an_end_without_impairments() -> None:
    report = end_report(Endpoint("x", "eth1", None), 3, Capabilities(netem=False))
    assert report.to_api() == {"uid": 3, "intf": "eth1", "state": "up"} and report.message == ""

