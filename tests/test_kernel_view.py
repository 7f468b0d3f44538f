"""meshnetd's kernel view read in-process over rtnetlink (meshnet.rtnl, kernel.read_view) is what
`ip -j -d addr show` printed, for every link kind meshnet makes; a reconcile pass reads each
namespace once, however many pods' veths share it, and still heals what was deleted behind its back.

Real namespaces (`mnt-`, always removed), links built the daemon's way (plan → render → Executor),
underlay only 198.51.100.0/24 inside our own node namespace."""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnet import rtnl
from meshnet.daemon import kernel
from meshnet.daemon.config import DEFAULT_GRPC_PORT as GRPC_PORT
from meshnet.daemon.netns import NETNS_DIR
from meshnet.daemon.node import NodeDaemon
from meshnet.executor import Executor
from meshnet.model import Impairments, parse_manifest
from meshnet.plan import Endpoint, MacvlanPlan, NodeInfo, VethPlan, VxlanPlan
from meshnet.render import render
from meshnet.store.sqlite import SqliteStore
from tests.netns import ip, netns_set
from tests.test_daemon_core import FakePeers, set_alive

pytestmark = pytest.mark.root

V4 = [ipaddress.ip_interface(f"10.78.{i}.1/24") for i in range(6)]
V6 = [ipaddress.ip_interface(f"2001:db8:78:{i}::1/64") for i in range(6)]


def _through_ip(executor: Executor, names: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    return {ns: {e["ifname"]: e for e in executor.show(ns)} for ns in names}


def _differences(fast: dict[str, Any], slow: dict[str, Any], where: str = "") -> list[str]:
    """Where an rtnetlink entry disagrees with `ip`'s: every key it has must be `ip`'s, with
    `ip`'s value (flags without `ip`'s own M-DOWN; linkinfo and addresses key by key)."""
    out: list[str] = []
    for key, value in fast.items():
        theirs = slow.get(key)
        if key == "flags":
            theirs = [f for f in theirs or [] if f != "M-DOWN"]
            value = list(value)  # a slim entry's are a shared tuple
        if isinstance(value, dict) and isinstance(theirs, dict):
            out += _differences(value, theirs, f"{where}{key}.")
        elif key == "addr_info" and isinstance(theirs, list) and len(value) == len(theirs):
            for i, (a, b) in enumerate(zip(value, theirs, strict=True)):
                out += _differences(a, b, f"{where}addr_info[{i}].")
        elif value != theirs:
            out.append(f"{where}{key}: rtnetlink {value!r}, ip {theirs!r}")
    return out


def _compare(executor: Executor, names: list[str]) -> tuple[dict[str, Any], list[str]]:
    """rtnetlink's full reading (`rtnl.views`), `ip`'s, and the daemon's slim one (`kernel.read_view`:
    the keys it reads), and where they differ. Read again while they differ (a link-local address
    leaves `tentative` between two readings), for up to 5 s."""
    deadline = time.monotonic() + 5
    while True:
        fast: dict[str, Any] = rtnl.views(names)
        slow = _through_ip(executor, names)
        daemon = kernel.read_view(executor, names)
        problems = [f"{ns}: names {sorted(fast[ns])} vs {sorted(slow[ns])}" for ns in names
                    if set(fast[ns]) != set(slow[ns]) or set(daemon[ns]) != set(slow[ns])]
        problems += [f"{ns}/{name}: {d}" for ns in names for name in fast[ns] if name in slow[ns]
                     for d in _differences(fast[ns][name], slow[ns][name])]
        problems += [f"{ns}/{name} (slim): {d}" for ns in names for name in daemon[ns] if name in slow[ns]
                     for d in _differences(daemon[ns][name], slow[ns][name])]
        # Slim is the full entry cut to the daemon's keys, nothing else.
        problems += [f"{ns}/{name}: slim {daemon[ns][name]} != {rtnl.slimmed(fast[ns][name])}" for ns in names
                     for name in daemon[ns] if name in fast[ns] and daemon[ns][name] != rtnl.slimmed(fast[ns][name])]
        if not problems or time.monotonic() > deadline:
            return fast, problems
        time.sleep(0.2)


def _compare_ends(executor: Executor, wanted: dict[str, list[str]]) -> list[str]:
    """Where `read_ends` disagrees with the whole view (read again while they differ: a link-local
    address leaves `tentative` between two readings), for up to 5 s."""
    deadline = time.monotonic() + 5
    while True:
        before = kernel.STATS["ip_fallbacks"]
        some, whole = kernel.read_ends(executor, wanted), kernel.read_view(executor, list(wanted))
        problems = [f"{ns}: fell back to ip" for ns in wanted if kernel.STATS["ip_fallbacks"] != before]
        problems += [f"{ns}: names {sorted(some[ns])}, whole view {sorted(whole[ns])}" for ns in wanted
                     if set(some[ns]) != set(whole[ns]) & set(wanted[ns])]
        problems += [f"{ns}/{name}: {some[ns][name]} != {whole[ns][name]}" for ns in wanted for name in some[ns]
                     if name in whole[ns] and some[ns][name] != whole[ns][name]]
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.2)


@pytest.fixture
def spaces() -> Iterator[list[str]]:
    with netns_set(4) as names:
        yield names


def test_the_view_is_what_ip_shows_for_every_link_kind(spaces: list[str]) -> None:
    node, pa, pb, pc = spaces
    executor = Executor()
    caps = executor.capabilities()
    # The node's underlay: one end of a veth inside the node namespace (this kernel has no dummy).
    ip("-n", node, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
    ip("-n", node, "addr", "add", "198.51.100.10/24", "dev", "ul0")
    for dev in ("ul0", "ul1"):
        ip("-n", node, "link", "set", dev, "up")
    delay = Impairments(delay=5000, loss=1.0) if caps.netem else Impairments(rate=8_000_000)
    plans = [
        # veth: a chosen MAC, IPv4 + IPv6, impairments on one end, the other end declared down.
        VethPlan(1, Endpoint(pa, "eth1", V4[0], mac="02:78:00:00:00:01", ips=(V6[0],),
                             impairments=Impairments(rate=8_000_000)),
                 Endpoint(pb, "eth1", ipaddress.ip_interface("10.78.0.2/24"), state="down"), node, 1500),
        # vxlan: up with v4 + v6 and impairments; and one down without addresses.
        VxlanPlan(2, Endpoint(pa, "eth2", V4[1], ips=(V6[1],), impairments=delay), 4096 * 7 + 2,
                  "198.51.100.11", "198.51.100.10", "ul0", node, 1450),
        VxlanPlan(3, Endpoint(pb, "eth2", None, state="down"), 4096 * 7 + 3,
                  "198.51.100.12", "198.51.100.10", "ul0", node, 1400),
        # macvlan: a chosen MAC, two addresses.
        MacvlanPlan(4, Endpoint(pc, "eth1", V4[2], mac="02:78:00:00:00:04", ips=(V6[2],)), "ul0", node, None),
    ]
    executor.apply(render(plans, "add", caps))
    names = [node, pa, pb, pc]
    before = kernel.STATS["ip_fallbacks"]
    fast, problems = _compare(executor, names)
    assert problems == []
    assert kernel.STATS["ip_fallbacks"] == before  # every namespace was read over rtnetlink
    # What the daemon reads is there, and its comparisons agree: nothing to do on either reading.
    assert kernel.link_kind(fast[pa]["eth1"]) == "veth" and kernel.ours(fast[pa]["eth1"])
    assert fast[pa]["eth1"]["address"] == "02:78:00:00:00:01" and fast[pa]["eth1"]["mtu"] == 1500
    assert fast[pa]["eth1"]["link_netnsid"] >= 0 and fast[pa]["eth1"]["link_index"] > 0
    assert kernel.addresses(fast[pa]["eth1"]) >= {"10.78.0.1/24", "2001:db8:78::1/64"}
    assert not kernel.admin_up(fast[pb]["eth1"]) and not kernel.admin_up(fast[pb]["eth2"])
    assert kernel.vxlan_matches(fast[pa]["eth2"], plans[1])  # type: ignore[arg-type]
    assert fast[pa]["eth2"]["linkinfo"]["info_data"] == {"id": 4096 * 7 + 2, "remote": "198.51.100.11",
                                                          "local": "198.51.100.10", "port": 4789}
    assert fast[pc]["eth1"]["linkinfo"] == {"info_kind": "macvlan", "info_data": {"mode": "bridge"}}
    assert fast[pa]["eth2"]["qdisc"] != "noqueue"  # the impairments' tree is there
    applied = kernel.in_force_after(plans, caps)
    slow = _through_ip(executor, names)
    assert kernel.differences(plans, fast, caps, applied) == kernel.differences(plans, slow, caps, applied) == []
    assert kernel.differences(plans, kernel.read_view(executor, names), caps, applied) == []  # the daemon's slim view
    assert fast[node]["ul0"]["addr_info"][0]["local"] == "198.51.100.10"
    # Some ends alone (a peer call's page): each as the whole view shows it; absent ones left out.
    wanted = {pa: ["eth2", "eth1", "nosuch"], pb: ["eth2"], pc: ["eth1"], node: ["ul0"], "mnt-gone-e1e1e1": ["eth1"]}
    assert _compare_ends(executor, wanted) == []
    # Changed behind the daemon's back: both readings see the same.
    ip("-n", pa, "addr", "del", str(V4[1]), "dev", "eth2")
    ip("-n", pc, "link", "del", "eth1")
    fast, problems = _compare(executor, names)
    assert problems == []
    assert _compare_ends(executor, wanted) == []  # eth2 without its address, pc's eth1 gone
    assert kernel.read_ends(executor, {pc: ["eth1"]}) == {pc: {}}
    assert kernel.differences(plans, fast, caps, applied) == kernel.differences(
        plans, _through_ip(executor, names), caps, applied) != []


def test_a_missing_namespace_is_empty_and_a_bad_name_never_reaches_a_path() -> None:
    executor = Executor()
    assert kernel.read_view(executor, ["mnt-gone-a1b2c3"]) == {"mnt-gone-a1b2c3": {}}
    assert kernel.read_view(executor, ["../../etc"]) == {"../../etc": {}}
    found = rtnl.views(["mnt-gone-a1b2c3", "../../etc"])
    assert all(isinstance(v, OSError) for v in found.values())


def test_many_namespaces_are_read_in_chunks_and_leave_no_socket(spaces: list[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtnl, "CHUNK", 3)  # 4 namespaces and a missing one: two chunks
    entered: list[int] = []
    real = rtnl.in_each_netns
    monkeypatch.setattr(rtnl, "in_each_netns", lambda names, fn: entered.append(len(names)) or real(names, fn))
    fds = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(20):
        found = rtnl.views([*spaces, "mnt-gone-d1d1d1"])
        assert isinstance(found.pop("mnt-gone-d1d1d1"), FileNotFoundError)
        assert set(found) == set(spaces) and all(isinstance(v, dict) and "lo" in v for v in found.values())
    assert entered[:2] == [3, 2]
    assert len(list(Path("/proc/self/fd").iterdir())) == fds  # every socket and netns fd closed
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("in-")]


def test_odd_answers_end_a_dump_with_an_oserror() -> None:
    """A truncated message or a kernel error ends the read with an OSError, never another exception."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.settimeout(1)
        b.send(rtnl._NLMSGHDR.pack(4096, rtnl.RTM_NEWLINK, 0, 1, 0))  # claims more than it holds
        with pytest.raises(OSError):
            list(rtnl._dump(a, b"", 1))
        b.send(rtnl._NLMSGHDR.pack(20, rtnl.NLMSG_ERROR, 0, 1, 0) + rtnl._S32.pack(-1))  # EPERM
        with pytest.raises(OSError):
            list(rtnl._dump(a, b"", 1))
    # An attribute running past its message is dropped; a link without a name is no link.
    body = rtnl._IFINFOMSG.pack(0, 1, 5, 0x1, 0) + rtnl._RTATTR.pack(200, rtnl.IFLA_IFNAME) + b"eth1\0\0\0\0"
    assert rtnl._link_entry(body, 0, len(body)) is None
    assert rtnl._addr_entry(b"\x02\x18", 0, 2) is None


def _link_message(name: str, index: int, flags: int = 0) -> bytes:
    attr = name.encode() + b"\0"
    attr += b"\0" * (-len(attr) % 4)
    body = rtnl._IFINFOMSG.pack(0, 1, index, 0x1, 0) + rtnl._RTATTR.pack(4 + len(name) + 1, rtnl.IFLA_IFNAME) + attr
    return rtnl._NLMSGHDR.pack(rtnl._NLMSGHDR.size + len(body), rtnl.RTM_NEWLINK, flags, 1, 0) + body


_DONE = rtnl._NLMSGHDR.pack(rtnl._NLMSGHDR.size + 4, rtnl.NLMSG_DONE, 0, 1, 0) + rtnl._S32.pack(0)


def fake_link_dumps(monkeypatch: pytest.MonkeyPatch, dumps: list[list[bytes]]) -> list[list[bytes]]:
    """`rtnl.links` reads `dumps[i]` (one receive buffer each) through its i-th socket; returns
    the sockets' answers opened so far."""
    opened: list[list[bytes]] = []

    class Dump:
        def __init__(self) -> None:
            self.answers = list(dumps[len(opened)])
            opened.append(self.answers)

        def __enter__(self) -> Dump:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def settimeout(self, _t: float) -> None:
            pass

        def bind(self, _a: object) -> None:
            pass

        def send(self, _b: bytes) -> None:
            pass

        def recv(self, _n: int) -> bytes:
            return self.answers.pop(0) if self.answers else b""

    monkeypatch.setattr(rtnl, "in_netns", lambda _ns, _fn: Dump())
    return opened


def test_a_link_dump_the_kernel_marks_interrupted_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Links that came or went during a dump make the kernel mark it interrupted, and it may lack
    interfaces that were there all along: `lab status` then called a link "missing"."""
    dumps = [[_link_message("lo", 1, rtnl.NLM_F_DUMP_INTR), _DONE],  # eth5 missed: interrupted
             [_link_message("lo", 1) + _link_message("eth5", 7), _DONE]]
    opened = fake_link_dumps(monkeypatch, dumps)
    assert set(rtnl.links("mnt-any")) == {"lo", "eth5"} and len(opened) == 2
    # One that stays interrupted is read LINK_DUMP_ATTEMPTS times, and the last read is what is said.
    dumps[1:] = [dumps[0]] * rtnl.LINK_DUMP_ATTEMPTS
    opened.clear()
    assert set(rtnl.links("mnt-any")) == {"lo"} and len(opened) == rtnl.LINK_DUMP_ATTEMPTS


@pytest.mark.parametrize("answer", [
    b"",  # the socket's end before NLMSG_DONE
    rtnl._NLMSGHDR.pack(4096, rtnl.RTM_NEWLINK, 0, 1, 0),  # a header claiming more than was received
    rtnl._NLMSGHDR.pack(3, rtnl.RTM_NEWLINK, 0, 1, 0),  # one claiming less than a header
    rtnl._NLMSGHDR.pack(rtnl._NLMSGHDR.size + 4, rtnl.NLMSG_ERROR, 0, 1, 0) + rtnl._S32.pack(-1),  # EPERM
], ids=["eof", "too-long", "too-short", "error"])
def test_a_link_dump_cut_short_is_an_oserror_not_a_shorter_list(monkeypatch: pytest.MonkeyPatch,
                                                                 answer: bytes) -> None:
    """What was read before it would call every later link "missing": the namespace reads as
    unreadable instead (`lab status`: its links missing, as for a namespace that is gone)."""
    fake_link_dumps(monkeypatch, [[_link_message("lo", 1), answer]])
    with pytest.raises(OSError):
        rtnl.links("mnt-any")


def test_a_link_message_without_a_name_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    # An attribute running past its message is dropped: the link has no name to report.
    body = rtnl._IFINFOMSG.pack(0, 1, 5, 0x1, 0) + rtnl._RTATTR.pack(200, rtnl.IFLA_IFNAME) + b"eth1\0\0\0\0"
    nameless = rtnl._NLMSGHDR.pack(rtnl._NLMSGHDR.size + len(body), rtnl.RTM_NEWLINK, 0, 1, 0) + body
    short = rtnl._NLMSGHDR.pack(rtnl._NLMSGHDR.size + 4, rtnl.RTM_NEWLINK, 0, 1, 0) + b"\0" * 4  # no ifinfomsg
    fake_link_dumps(monkeypatch, [[_link_message("lo", 1) + nameless + short + _link_message("eth5", 7), _DONE]])
    assert set(rtnl.links("mnt-any")) == {"lo", "eth5"}


# --- a pass reads each namespace once ---------------------------------------------------------------

MESH = """
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: h}
spec:
  links:
  - {uid: 1, peer_pod: s1, local_intf: eth1, peer_intf: eth1, local_ip: 10.79.1.1/24, peer_ip: 10.79.1.2/24}
  - {uid: 2, peer_pod: s2, local_intf: eth2, peer_intf: eth1, local_ip: 10.79.2.1/24, peer_ip: 10.79.2.2/24}
  - {uid: 3, peer_pod: s3, local_intf: eth3, peer_intf: eth1, local_ip: 10.79.3.1/24, peer_ip: 10.79.3.2/24}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: s1}
spec:
  links:
  - {uid: 1, peer_pod: h, local_intf: eth1, peer_intf: eth1, local_ip: 10.79.1.2/24, peer_ip: 10.79.1.1/24}
  - {uid: 4, peer_pod: s2, local_intf: eth2, peer_intf: eth2, local_ip: 10.79.4.1/24, peer_ip: 10.79.4.2/24}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: s2}
spec:
  links:
  - {uid: 2, peer_pod: h, local_intf: eth1, peer_intf: eth2, local_ip: 10.79.2.2/24, peer_ip: 10.79.2.1/24}
  - {uid: 4, peer_pod: s1, local_intf: eth2, peer_intf: eth2, local_ip: 10.79.4.2/24, peer_ip: 10.79.4.1/24}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: s3}
spec:
  links:
  - {uid: 3, peer_pod: h, local_intf: eth1, peer_intf: eth3, local_ip: 10.79.3.2/24, peer_ip: 10.79.3.1/24}
"""


def test_a_pass_reads_each_namespace_once_and_heals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with netns_set(5) as (node_ns, *pods):
        store = SqliteStore(tmp_path / "store.db")
        for t in parse_manifest(MESH).topologies:
            store.apply(t)
        executor = Executor()
        core = NodeDaemon(NodeInfo("node0", "198.51.100.1", "eth0", node_ns), store, executor, FakePeers(),
                          grpc_port=GRPC_PORT)
        try:
            by_pod = dict(zip(["h", "s1", "s2", "s3"], pods, strict=True))
            for pod, ns in by_pod.items():
                set_alive(store, pod, "node0", "198.51.100.1", str(NETNS_DIR / ns), f"c-{pod}", here=core)
            core.reconcile()  # the first pass builds every link
            for ns in pods:
                assert {"eth1"} <= set(rtnl.links(ns))
            read: list[str] = []
            real = rtnl.views

            def counting(names: Any, *args: Any, **kw: Any) -> Any:
                names = list(names)
                read.extend(names)
                return real(names, *args, **kw)

            monkeypatch.setattr(rtnl, "views", counting)
            batches = len(executor.journal.entries)
            assert core.reconcile() == 0  # idle: nothing to do
            # h's pass reads h, s1, s2, s3; s1's, s2's and s3's find theirs read already.
            assert sorted(read) == sorted(pods) and core.reconciler.last_pass_reads == len(pods)
            assert len(executor.journal.entries) == batches  # nothing ran
            # A veth deleted behind the daemon's back (s1 <-> s2): the pass makes it again, on a
            # fresh read of the namespaces it acts on.
            ip("-n", by_pod["s1"], "link", "del", "eth2")
            read.clear()
            assert core.reconcile() == 1
            assert "eth2" in rtnl.links(by_pod["s1"]) and "eth2" in rtnl.links(by_pod["s2"])
            assert len(read) > len(pods)  # s1's and s2's namespaces read again before acting
            read.clear()
            assert core.reconcile() == 0 and sorted(read) == sorted(pods)
        finally:
            core.close()
            store.close()


def test_an_end_found_as_declared_needs_no_change_exactly_when_change_end_says_so() -> None:
    """kernel.end_changes answers "nothing" without building the end as found; it must agree with
    change_end on every combination of addresses, state and impairments (recorded or not)."""
    import itertools

    from meshnet.ends import change_end
    from meshnet.plan import Capabilities

    def entry(addrs: tuple[str, ...], up: bool) -> dict[str, Any]:
        info = [{"family": "inet6" if ":" in a else "inet", "local": a.split("/")[0],
                 "prefixlen": int(a.split("/")[1]), "scope": "link" if a.startswith("fe80") else "global"}
                for a in addrs]
        return {"ifname": "eth1", "flags": ["BROADCAST", "UP"] if up else ["BROADCAST"], "addr_info": info}

    kernel_addrs = [(), ("10.78.0.1/24",), ("10.78.0.1/24", "fe80::1/64"), ("10.78.0.1/24", "2001:db8:78::1/64"),
                    ("10.78.0.9/24",), ("10.78.0.1/30",)]
    declared = [(None, ()), (V4[0], ()), (V4[0], (V6[0],)), (None, (V6[0],))]
    impairments = [None, Impairments(rate=8_000_000), Impairments(delay=5000)]
    checked = 0
    for caps in (Capabilities(netem=True), Capabilities(netem=False)):
        for addrs, up, (ip4, ips), state, imp, recorded in itertools.product(
                kernel_addrs, (True, False), declared, ("up", "down"), impairments, [*impairments, "missing"]):
            end = Endpoint("mnt-x", "eth1", ip4, ips=ips, state=state, impairments=imp)
            applied = {} if recorded == "missing" else {("mnt-x", "eth1"): recorded}
            found = entry(addrs, up)
            expected = change_end(kernel.as_found(found, end, applied), end, 7, caps)
            assert kernel.end_changes(found, end, 7, caps, applied) == expected, (addrs, up, end, applied)
            checked += 1
    assert checked == 2 * 6 * 2 * 4 * 2 * 3 * 4


def test_a_dump_the_kernel_keeps_interrupting_is_read_through_ip(spaces: list[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Never an empty view for a namespace that exists: that would read as every link missing."""
    calls: list[int] = []

    def interrupted(sock: socket.socket, timeout: float, slim: bool = False) -> dict[str, Any]:
        calls.append(1)
        raise rtnl.DumpInterrupted(errno.EINTR, "netlink: the dump was interrupted by a change")

    monkeypatch.setattr(rtnl, "_read_view", interrupted)
    before = kernel.STATS["ip_fallbacks"]
    view = kernel.read_view(Executor(), spaces[:1])
    assert "lo" in view[spaces[0]] and kernel.STATS["ip_fallbacks"] == before + 1
    assert len(calls) == 5  # read again before giving up


def test_ends_read_alone_are_not_lost_to_the_kernels_ipv6_work_on_new_interfaces(spaces: list[str]) -> None:
    """A page of a peer call reads its ends alone: right after hundreds of interfaces come up, the
    kernel's duplicate address detection keeps interrupting namespace-wide IPv6 address dumps; the
    ends are read all the same over rtnetlink (no `ip` fallback), each with its addresses."""
    ns = spaces[0]
    count = 800
    lines = [f"link add e{i} type veth peer name f{i}" for i in range(count)]
    lines += [f"addr add 10.{80 + i // 250}.{i % 250}.1/30 dev e{i}" for i in range(count)]
    lines += [f"link set {d}{i} up" for i in range(count) for d in "ef"]
    ip("-n", ns, "-batch", "-", stdin="\n".join(lines) + "\n")
    names = [f"e{i}" for i in range(0, count, 2)]
    # Read again and again through the detection's window (a namespace-wide dump here fell back
    # to `ip` about once in 17 reads at 800 interfaces, and five times in a row at 1500).
    started, reads = time.monotonic(), 0
    while time.monotonic() - started < 2.5:
        found = rtnl.ends(ns, [*names, "nosuch"])
        assert isinstance(found, dict), f"read {reads}: {found!r}"
        assert sorted(found) == sorted(names)
        for i in range(0, count, 2):
            assert f"10.{80 + i // 250}.{i % 250}.1/30" in kernel.addresses(found[f"e{i}"])
            assert kernel.link_kind(found[f"e{i}"]) == "veth" and kernel.admin_up(found[f"e{i}"])
        reads += 1
    assert reads >= 3


def test_an_interrupted_address_dump_of_one_end_is_read_again_and_a_gone_one_is_absent(
        spaces: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ns = spaces[0]
    ip("-n", ns, "link", "add", "e1", "type", "veth", "peer", "name", "f1")
    ip("-n", ns, "addr", "add", "10.81.0.1/30", "dev", "e1")
    real = rtnl._dump
    calls: list[int] = []

    def once_interrupted(sock: socket.socket, request: bytes, seq: int) -> Any:
        calls.append(seq)
        if len(calls) == 1:
            raise rtnl.DumpInterrupted(errno.EINTR, "netlink: the dump was interrupted by a change")
        return real(sock, request, seq)

    monkeypatch.setattr(rtnl, "_dump", once_interrupted)
    found = rtnl.ends(ns, ["e1", "f1"])
    assert isinstance(found, dict) and kernel.addresses(found["e1"]) == {"10.81.0.1/30"}
    assert calls[:2] == [6, 6]  # the dump of e1's addresses (every family), again
    # Always interrupted: the read fails (EINTR) and the caller reads the namespace whole.
    monkeypatch.setattr(rtnl, "_dump", lambda *a: (_ for _ in ()).throw(
        rtnl.DumpInterrupted(errno.EINTR, "netlink: the dump was interrupted by a change")))
    failed = rtnl.ends(ns, ["e1"])
    assert isinstance(failed, OSError) and failed.errno == errno.EINTR
    monkeypatch.setattr(rtnl, "_dump", real)
    # An interface gone between its link and its addresses (a dump filtered to a gone index):
    # the kernel says ENODEV in the dump's end, and the end counts as absent.
    sock = rtnl.in_netns(ns, rtnl._open)
    with sock:
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.setsockopt(rtnl.SOL_NETLINK, rtnl.NETLINK_GET_STRICT_CHK, 1)
        assert rtnl._addresses_of(sock, 987654, 3) is None
        assert rtnl._get_links(sock, ["e1", "gone0"]).keys() == {"e1"}
    assert rtnl.ends("mnt-gone-f2f2f2", ["e1"]).errno == errno.ENOENT  # type: ignore[union-attr]
    # Names Linux refuses are never asked for: absent (a NUL would have named e1 to the kernel).
    asked: list[list[str]] = []
    get_links = rtnl._get_links
    monkeypatch.setattr(rtnl, "_get_links", lambda sock, names, *a: asked.append(names) or get_links(sock, names, *a))
    found = rtnl.ends(ns, ["e1\x00x", "e1 x", "e" * 40, "", "e1"])
    assert isinstance(found, dict) and set(found) == {"e1"} and asked == [["e1"]]
    monkeypatch.setattr(rtnl, "_get_links", get_links)
    # A kernel where some family refuses an index-filtered dump of every family: one per family.
    monkeypatch.setattr(rtnl, "_UNSPEC_FILTER", True)
    families: list[int] = []
    family_of = rtnl._family_of

    def refusing(sock: socket.socket, family: int, index: int, tries: int, slim: bool = False) -> Any:
        families.append(family)
        if family == socket.AF_UNSPEC:
            raise OSError(errno.EINVAL, "netlink dump: error 22")
        return family_of(sock, family, index, tries, slim)

    monkeypatch.setattr(rtnl, "_family_of", refusing)
    found = rtnl.ends(ns, ["e1", "f1"])
    assert isinstance(found, dict) and kernel.addresses(found["e1"]) == {"10.81.0.1/30"}
    assert families == [socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6, socket.AF_INET, socket.AF_INET6]
    assert rtnl._UNSPEC_FILTER is False


def test_a_family_whose_dump_keeps_being_interrupted_is_read_interface_by_interface(
        spaces: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole view: IPv6's namespace-wide dump always interrupted (the kernel's address work on
    new interfaces) costs neither the IPv4 read nor an `ip` fallback."""
    ns = spaces[0]
    ip("-n", ns, "link", "add", "e1", "type", "veth", "peer", "name", "f1")
    ip("-n", ns, "addr", "add", "10.82.0.1/30", "dev", "e1")
    ip("-n", ns, "addr", "add", "2001:db8:82::1/64", "dev", "e1", "nodad")
    ip("-n", ns, "link", "set", "e1", "up")
    executor = Executor()
    expected = kernel.read_view(executor, [ns])[ns]
    real = rtnl._dump
    seqs: list[int] = []

    def v6_interrupted(sock: socket.socket, request: bytes, seq: int) -> Any:
        seqs.append(seq)
        if seq in (2, 7):  # the namespace-wide address dumps of every family and of IPv6
            raise rtnl.DumpInterrupted(errno.EINTR, "netlink: the dump was interrupted by a change")
        return real(sock, request, seq)

    monkeypatch.setattr(rtnl, "_dump", v6_interrupted)
    before = kernel.STATS["ip_fallbacks"]
    view = kernel.read_view(executor, [ns])[ns]
    assert kernel.STATS["ip_fallbacks"] == before
    # Every family at once, then IPv4 alone (once), IPv6 alone (tried twice), then by interface.
    assert seqs.count(2) == 1 and seqs.count(3) == 1 and seqs.count(7) == rtnl._FAMILY_TRIES
    assert seqs.count(5) == len(view)  # one IPv6 dump per interface (lo, e1, f1)
    assert view == expected
    assert kernel.addresses(view["e1"]) >= {"10.82.0.1/30", "2001:db8:82::1/64"}


def test_slim_views_share_values_in_bounded_tables_whatever_a_pods_owner_sets() -> None:
    """Group numbers and flags are whoever made the interface's choice (a pod's owner can make
    hundreds): the slim reader's shared tables stay bounded, and every entry still says its own."""
    with netns_set(1) as (ns,):
        lines = []
        for i in range(150):
            lines += [f"link add g{i} group {1000 + 2 * i} type veth peer name h{i} group {1001 + 2 * i}",
                      *([f"link set g{i} up"] if i % 2 else [])]
        ip("-n", ns, "-batch", "-", stdin="\n".join(lines) + "\n")
        view = rtnl.views([ns], slim=True)[ns]
        full = rtnl.views([ns])[ns]
        def links_only(entry: dict[str, Any]) -> dict[str, Any]:  # addresses come and go (IPv6 DAD)
            return {k: v for k, v in entry.items() if k != "addr_info"}

        assert {n: links_only(rtnl.slimmed(e)) for n, e in full.items()} == {n: links_only(e) for n, e in view.items()}
        assert view["g7"]["group"] == "1014" and view["h7"]["group"] == "1015"
        assert kernel.admin_up(view["g7"]) and not kernel.admin_up(view["g8"])
        assert len(rtnl._SLIM_GROUPS) <= 256 and len(rtnl._SLIM_FLAGS) <= 256  # 300 groups were read
