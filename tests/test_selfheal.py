"""Self-healing (issue 6), proven through the emulated lab: every scenario is checked twice, by
ping and by comparing the kernel with the desired state (`assert_converged`).

Desired state comes from the store (the Topologies the daemons watch) and the lab's pod records
(which pods are up, on which node); the kernel's state from `ip -j -d addr show` in every namespace
of the lab. `test_soak.py` and `benchmarks/selfheal.py` reuse the helpers of this module:

    problems = convergence_problems(lab)      # [] when the kernel is exactly what the store wants
    assert_converged(lab)                     # polls up to 3 s, then asserts problems == []
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshnet import naming
from meshnet.cni import protocol
from meshnet.daemon.netns import NETNS_DIR
from meshnet.lab.cluster import Lab
from meshnet.lab.kubelet import CNI_PLUGIN_DIRS
from meshnet.model import Topology
from meshnet.store import open_store
from tests.labkit import failed_pings, lab_up

TESTS = Path(__file__).parent
THREE = (TESTS / "3node.yml").read_text()

# What the lab itself puts in a node namespace: the underlay uplink and the eth0 bridge.
NODE_BASE = {"lo", "eth0", "mnl0"}
BRIDGE = "mnl0"


@dataclass(frozen=True)
class Want:
    """One meshnet interface a pod should have."""

    uid: int
    kind: str  # veth | vxlan | macvlan
    ip: str | None
    peer_pod: str = ""
    peer_intf: str = ""
    vni: int = 0
    remote: str = ""
    local: str = ""


def _vtep(lab: Lab, node: str) -> str:
    return lab.node_info(lab.state.nodes.index(node)).vtep_ip


def topologies(lab: Lab) -> dict[tuple[str, str], Topology]:
    store = open_store(lab.state.store_url)
    try:
        return {t.key: t for t in store.list(None)}
    finally:
        store.close()


def up_pods(lab: Lab) -> dict[str, str]:
    """{pod: node} of the pods the lab has running."""
    return {r.name: r.node for r in lab.state.pods.values() if r.state == "up"}


def desired(lab: Lab, topos: Mapping[tuple[str, str], Topology]) -> dict[str, dict[str, Want]]:
    """{pod: {ifname: Want}} for every up pod: links whose peer is up (macvlan always)."""
    up = up_pods(lab)
    out: dict[str, dict[str, Want]] = {}
    for rec in lab.state.pods.values():
        if rec.state != "up":
            continue
        want: dict[str, Want] = {}
        topo = topos.get((rec.namespace, rec.name))
        for lnk in topo.links if topo is not None else ():
            ip = None if lnk.local_ip is None else str(lnk.local_ip)
            if lnk.is_macvlan:
                want[lnk.local_intf] = Want(lnk.uid, "macvlan", ip)
            elif lnk.peer_pod not in up:
                continue
            elif up[lnk.peer_pod] == rec.node:
                want[lnk.local_intf] = Want(lnk.uid, "veth", ip, lnk.peer_pod, lnk.peer_intf)
            else:
                # The VNI's block is the smaller one the two ends recorded (naming.link_block).
                peer = topos.get((rec.namespace, lnk.peer_pod))
                block = naming.link_block(rec.namespace, topo.status.vni_block if topo else 0,
                                          peer.status.vni_block if peer else 0)
                want[lnk.local_intf] = Want(lnk.uid, "vxlan", ip, lnk.peer_pod, lnk.peer_intf,
                                            naming.vni(rec.namespace, lnk.uid, block), _vtep(lab, up[lnk.peer_pod]),
                                            _vtep(lab, rec.node))
        out[rec.name] = want
    return out


def _addresses(entry: Mapping[str, Any]) -> set[str]:
    return {f"{a.get('local')}/{a.get('prefixlen')}" for a in entry.get("addr_info", ()) if a.get("scope") != "link"}


def _kind(entry: Mapping[str, Any] | None) -> str:
    return str((entry or {}).get("linkinfo", {}).get("info_kind", ""))


def convergence_problems(lab: Lab, *, foreign: Mapping[str, Iterable[str]] | None = None,
                         statuses: bool = True) -> list[str]:
    """Every way the kernel (and the store's per-link status) differs from the desired state.

    `foreign`: {pod: interface names} that meshnet did not make and must leave alone (they must
    still be there). `statuses`: also require each up pod's status to own it and show its links.
    """
    leave = {pod: set(names) for pod, names in (foreign or {}).items()}
    topos = topologies(lab)
    want = desired(lab, topos)
    recs = lab.state.pods
    views = {pod: lab.kernel_links(recs[pod].netns) for pod in want}
    problems: list[str] = []
    for pod, wanted in sorted(want.items()):
        view = views[pod]
        if "eth0" not in view:
            problems.append(f"{pod}: no eth0 (namespace {recs[pod].netns} missing?)")
        extra = leave.get(pod, set())
        missing_foreign = extra - set(view)
        if missing_foreign:
            problems.append(f"{pod}: interfaces meshnet did not make were removed: {sorted(missing_foreign)}")
        have = set(view) - {"lo", "eth0"} - extra
        for name in sorted(have - set(wanted)):
            problems.append(f"{pod}: unexpected interface {name} ({_kind(view[name]) or 'device'})")
        for name, w in sorted(wanted.items()):
            entry = view.get(name)
            if entry is None:
                problems.append(f"{pod}: missing {name} (uid {w.uid}, {w.kind})")
                continue
            if _kind(entry) != w.kind:
                problems.append(f"{pod}: {name} is a {_kind(entry) or 'device'}, want {w.kind}")
                continue
            if "UP" not in entry.get("flags", ()):
                problems.append(f"{pod}: {name} is down")
            addrs = _addresses(entry)
            if addrs != ({w.ip} if w.ip else set()):
                problems.append(f"{pod}: {name} has addresses {sorted(addrs)}, want {w.ip}")
            if w.kind == "vxlan":
                data = entry.get("linkinfo", {}).get("info_data", {})
                got = (data.get("id"), data.get("remote"), data.get("local"))
                if got != (w.vni, w.remote, w.local):
                    want_ = (w.vni, w.remote, w.local)
                    problems.append(f"{pod}: {name} vxlan (id, remote, local) is {got}, want {want_}")
            elif w.kind == "veth":
                far = views.get(w.peer_pod, {}).get(w.peer_intf)
                if far is None or entry.get("link_index") != far.get("ifindex") \
                        or far.get("link_index") != entry.get("ifindex"):
                    problems.append(f"{pod}: {name} is not paired with {w.peer_pod}:{w.peer_intf}")
        if statuses:
            problems += _status_problems(lab, pod, topos, wanted)
    problems += _node_problems(lab)
    return problems


def _status_problems(lab: Lab, pod: str, topos: Mapping[tuple[str, str], Topology],
                     wanted: Mapping[str, Want]) -> list[str]:
    rec = lab.state.pods[pod]
    topo = topos.get((rec.namespace, pod))
    if topo is None:
        return []
    st = topo.status
    problems = []
    if (st.container_id, st.node, st.src_ip) != (rec.container_id, rec.node, _vtep(lab, rec.node)):
        problems.append(f"{pod}: status names container {st.container_id[:12]!r} on {st.node!r} via {st.src_ip!r}, "
                        f"the lab has {rec.container_id[:12]!r} on {rec.node!r}")
    if st.plumbing_error:
        problems.append(f"{pod}: plumbing_error {st.plumbing_error!r}")
    states = {s.uid: s for s in st.links}
    for lnk in topo.links:
        s = states.get(lnk.uid)
        w = wanted.get(lnk.local_intf)
        if w is not None and (s is None or (s.state, s.kind, s.intf) != ("up", w.kind, lnk.local_intf)):
            problems.append(f"{pod}: status of uid {lnk.uid} is {s}, want up {w.kind} {lnk.local_intf}")
        if w is None and (s is None or s.state != "pending"):
            problems.append(f"{pod}: status of uid {lnk.uid} is {s}, want pending")
    return problems


def _node_problems(lab: Lab) -> list[str]:
    """Nothing leaked into the nodes: only the lab's base interfaces and one bridge port per pod
    (each pod's eth0); and no namespace of the lab beyond its nodes, underlay, external and pods."""
    problems = []
    alive = {r.name for r in lab.state.pods.values() if r.state != "down"}
    for i, node in enumerate(lab.state.nodes):
        view = lab.kernel_links(lab.node_netns(i))
        ports = [n for n, e in view.items() if e.get("master") == BRIDGE and _kind(e) == "veth"]
        strays = sorted(set(view) - NODE_BASE - set(ports))
        if strays:
            problems.append(f"{node}: stray interfaces {strays}")
        pods_here = sum(1 for r in lab.state.pods.values() if r.node == node and r.name in alive)
        if len(ports) > pods_here:
            problems.append(f"{node}: {len(ports)} bridge ports for {pods_here} pod(s)")
    allowed = {lab.node_netns(i) for i in range(len(lab.state.nodes))}
    allowed |= {f"{lab.prefix}ul", lab.external_netns}
    allowed |= {r.netns for r in lab.state.pods.values() if r.name in alive}
    present = {p.name for p in NETNS_DIR.glob(f"{lab.prefix}*")}
    if present - allowed:
        problems.append(f"namespaces left over: {sorted(present - allowed)}")
    return problems


def wait_converged(lab: Lab, timeout: float = 3.0, **kwargs: Any) -> tuple[list[str], float]:
    """Poll until converged or `timeout`; returns (problems left, seconds it took)."""
    started = time.monotonic()
    while True:
        problems = convergence_problems(lab, **kwargs)
        elapsed = time.monotonic() - started
        if not problems or elapsed >= timeout:
            return problems, elapsed
        time.sleep(0.05)


def assert_converged(lab: Lab, timeout: float = 3.0, **kwargs: Any) -> None:
    problems, _ = wait_converged(lab, timeout, **kwargs)
    assert problems == [], f"lab {lab.name} not converged after {timeout}s:\n" + "\n".join(problems[:40])


# --- manifests -------------------------------------------------------------------------------------

def link_subnet(uid: int) -> ipaddress.IPv4Network:
    """A /30 per uid inside 10.0.0.0/8: documentation-free but never leaves the lab's namespaces."""
    return ipaddress.IPv4Network((0x0A000000 + uid * 4, 30))


def mesh_manifest(pods: Sequence[str], edges: Sequence[tuple[str, str]], *, nodes: Mapping[str, str] | None = None,
                  with_pods: Iterable[str] | None = None, uids: Sequence[int] | None = None) -> str:
    """A manifest: a Topology per pod with one addressed link per edge (uid `uids[i]`, default i+1;
    interface `e<uid>` at both ends, so a link keeps its names when others come and go), and a Pod
    object for each of `with_pods` (default all), pinned to `nodes[pod]` when given."""
    links: dict[str, list[dict[str, Any]]] = {p: [] for p in pods}
    for i, (a, b) in enumerate(edges):
        uid = uids[i] if uids is not None else i + 1
        net = link_subnet(uid)
        ia, ib = (f"{h}/{net.prefixlen}" for h in list(net.hosts())[:2])
        ea = eb = f"e{uid}"
        links[a].append({"uid": uid, "peer_pod": b, "local_intf": ea, "peer_intf": eb, "local_ip": ia, "peer_ip": ib})
        links[b].append({"uid": uid, "peer_pod": a, "local_intf": eb, "peer_intf": ea, "local_ip": ib, "peer_ip": ia})
    docs: list[dict[str, Any]] = [{"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology",
                                   "metadata": {"name": p}, "spec": {"links": links[p]}} for p in pods]
    for p in pods if with_pods is None else with_pods:
        spec: dict[str, Any] = {"containers": [{"name": "c", "image": "alpine:3"}]}
        if nodes and p in nodes:
            spec["nodeName"] = nodes[p]
        docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p}, "spec": spec})
    return yaml.safe_dump_all(docs, sort_keys=False)


def edit_manifest(text: str, pod: str, fn: Callable[[list[dict[str, Any]]], None]) -> str:
    """Apply `fn(links)` (edits the list in place) to the Topology of `pod` in manifest text."""
    docs = list(yaml.safe_load_all(text))
    for doc in docs:
        if doc and doc.get("kind") == "Topology" and doc["metadata"]["name"] == pod:
            fn(doc["spec"]["links"])
    return yaml.safe_dump_all(docs, sort_keys=False)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def assert_healthy(lab: Lab, **kwargs: Any) -> None:
    """Both proofs: kernel == desired state (polled), and every addressed link end answers a ping."""
    assert_converged(lab, **kwargs)
    assert failed_pings(lab) == []


# Flags the kernel sets as the carrier comes and goes, not anything meshnet did: an eth0 a moment
# after its ADD may still show NO-CARRIER (its bridge port not up yet), and then not.
_CARRIER_FLAGS = frozenset({"NO-CARRIER", "LOWER_UP"})


def snapshot(lab: Lab) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Identity of every interface of every up pod: a change of anything shows (re-created links get
    new ifindexes; the carrier's own coming and going aside)."""
    return {r.name: {n: (e.get("ifindex"), _kind(e), tuple(sorted(_addresses(e))),
                         tuple(f for f in e.get("flags", ()) if f not in _CARRIER_FLAGS))
                     for n, e in lab.kernel_links(r.netns).items()}
            for r in lab.state.pods.values() if r.state == "up"}


# --- the scenarios -----------------------------------------------------------------------------------

pytestmark = pytest.mark.root


def test_pod_restart_on_same_node_then_moved_to_another(tmp_path: Path) -> None:
    with lab_up(tmp_path, THREE, nodes=2) as lab:  # r1, r3 on node0, r2 on node1
        assert_healthy(lab)
        old = lab.state.pods["r1"].container_id
        rec = lab.restart_pod("r1")
        assert (rec.state, rec.node) == ("up", "node0") and rec.container_id != old
        assert_healthy(lab)
        # Moved: r1-r2 turns from vxlan into veth, r1-r3 from veth into vxlan, and r2's old vxlan
        # end (pointing at node0) must go while r3 gets a new one pointing at node1.
        rec = lab.restart_pod("r1", node="node1")
        assert (rec.state, rec.node) == ("up", "node1")
        assert_healthy(lab)
        kinds = {n: _kind(e) for n, e in lab.kernel_links(rec.netns).items()}
        assert (kinds["eth1"], kinds["eth2"]) == ("veth", "vxlan")


def test_daemon_killed_during_100_link_add_converges(tmp_path: Path) -> None:
    pods = ["a", "b"]
    edges = [("a", "b")] * 100
    full = mesh_manifest(pods, edges, nodes={"a": "node0", "b": "node1"})
    only_a = mesh_manifest(pods, edges, nodes={"a": "node0"}, with_pods=["a"])
    with lab_up(tmp_path, only_a, nodes=2) as lab:
        assert_healthy(lab)
        path = write(tmp_path, "full.yml", full)
        outcome: dict[str, Any] = {}

        def kubelet() -> None:
            try:
                outcome["result"] = lab.apply(path)
            except Exception as e:  # reported by the assertion below
                outcome["error"] = e

        worker = threading.Thread(target=kubelet)
        worker.start()
        # Kill b's daemon as soon as its ADD has started building: the first link is in b's netns.
        b_netns = lab.pod_netns("b")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and worker.is_alive():
            if len(lab.kernel_links(b_netns)) > 2:
                break
            time.sleep(0.005)
        during_add = worker.is_alive()
        lab.restart_daemon("node1")  # kill -9, start, wait until its first pass is done
        worker.join(60)
        assert not worker.is_alive() and "error" not in outcome, outcome
        rec = lab.state.pods["b"]
        if rec.state != "up":  # the ADD died with the daemon: the kubelet tears the sandbox down and retries
            assert during_add, rec.error
            rec = lab.restart_pod("b")
        assert rec.state == "up", rec.error
        assert_healthy(lab, timeout=5.0)
        assert len(lab.kernel_links(b_netns)) == 102  # lo, eth0 and every link exactly once


def test_hot_link_changes_apply_without_restarts(tmp_path: Path) -> None:
    with lab_up(tmp_path, THREE, nodes=2) as lab:  # r1, r3 on node0, r2 on node1
        assert_healthy(lab)
        sandboxes = {r.name: r.container_id for r in lab.state.pods.values()}
        eth0 = {p: v["eth0"] for p, v in snapshot(lab).items()}

        def add_links(links: list[dict[str, Any]], pod: str) -> None:
            new = {"r1": [(4, "r3", "eth3", "eth3", 1), (5, "r2", "eth4", "eth3", 2)],
                   "r2": [(5, "r1", "eth3", "eth4", 1)], "r3": [(4, "r1", "eth3", "eth3", 2)]}[pod]
            for uid, peer, mine, theirs, host in new:
                net = link_subnet(uid)
                me, other = (f"{net[h]}/30" for h in (host, 3 - host))
                links.append({"uid": uid, "peer_pod": peer, "local_intf": mine, "peer_intf": theirs,
                              "local_ip": me, "peer_ip": other})

        text = THREE
        for pod in ("r1", "r2", "r3"):
            text = edit_manifest(text, pod, functools.partial(add_links, pod=pod))
        assert lab.apply(write(tmp_path, "added.yml", text))["changed"] == ["r1", "r2", "r3"]
        assert_healthy(lab)  # uid 4 a veth on node0, uid 5 a vxlan between the nodes

        def readdress(links: list[dict[str, Any]]) -> None:
            for lnk in links:
                if lnk["uid"] == 1:
                    lnk["local_ip"], lnk["peer_ip"] = (ip_.replace("12.12.12.", "12.12.99.")
                                                       for ip_ in (lnk["local_ip"], lnk["peer_ip"]))

        text = edit_manifest(edit_manifest(text, "r1", readdress), "r2", readdress)
        lab.apply(write(tmp_path, "readdressed.yml", text))
        assert_healthy(lab)

        def drop_uid2(links: list[dict[str, Any]]) -> None:
            links[:] = [lnk for lnk in links if lnk["uid"] != 2]

        text = edit_manifest(edit_manifest(text, "r1", drop_uid2), "r3", drop_uid2)
        lab.apply(write(tmp_path, "removed.yml", text))
        assert_healthy(lab)
        assert "eth2" not in lab.kernel_links(lab.pod_netns("r1"))
        # No pod was restarted for any of it: same sandboxes, same eth0.
        assert {r.name: r.container_id for r in lab.state.pods.values()} == sandboxes
        assert {p: v["eth0"] for p, v in snapshot(lab).items()} == eth0


def test_50_pods_added_at_once_on_3_nodes_build_every_link_once(tmp_path: Path) -> None:
    pods = [f"p{i:02d}" for i in range(50)]
    edges = [(pods[i], pods[(i + 1) % 50]) for i in range(50)] + [(pods[i], pods[i + 25]) for i in range(25)]
    no_pods = mesh_manifest(pods, edges, with_pods=[])
    with lab_up(tmp_path, no_pods, nodes=3) as lab:
        added = lab.apply(write(tmp_path, "pods.yml", mesh_manifest(pods, edges)), workers=50)["pods_added"]
        assert sorted(added) == pods
        assert {r.name: r.error for r in lab.state.pods.values() if r.state != "up"} == {}
        assert sorted({r.node for r in lab.state.pods.values()}) == ["node0", "node1", "node2"]
        assert_healthy(lab, timeout=5.0)
        ends = sum(len(lab.kernel_links(r.netns)) - 2 for r in lab.state.pods.values())
        assert ends == 2 * len(edges)


def test_stale_del_of_an_old_sandbox_changes_nothing(tmp_path: Path) -> None:
    with lab_up(tmp_path, THREE, nodes=2) as lab:
        old = replace(lab.state.pods["r1"])
        lab.restart_pod("r1")
        assert_healthy(lab)
        before = snapshot(lab)
        status_before = topologies(lab)[("default", "r1")].status
        # The runtime's late DEL for the old sandbox: its container id, its (long gone) netns path.
        rc, answer = lab.cni("DEL", replace(old, netns=f"{lab.prefix}gone"))
        assert rc == 0, answer
        assert topologies(lab)[("default", "r1")].status == status_before
        assert snapshot(lab) == before
        assert_healthy(lab)


@pytest.mark.parametrize("trigger", ["daemon-restart", "store-change"])
def test_vanished_netns_is_detected_and_cleared(tmp_path: Path, trigger: str) -> None:
    with lab_up(tmp_path, THREE, nodes=2) as lab:  # r1, r3 on node0, r2 on node1
        rec = lab.state.pods["r1"]
        ip("netns", "del", rec.netns)  # behind meshnet's back: the sandbox died without a DEL
        rec.state = "down"
        if trigger == "daemon-restart":
            lab.restart_daemon("node0")
        else:  # any change of r1's Topology makes node0's daemon look at r1 again
            def mtu(links: list[dict[str, Any]]) -> None:
                links[0]["mtu"] = 1400
            text = edit_manifest(edit_manifest(THREE, "r1", mtu), "r2", mtu)
            lab.apply(write(tmp_path, "mtu.yml", text))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and topologies(lab)[("default", "r1")].status.alive:
            time.sleep(0.05)
        st = topologies(lab)[("default", "r1")].status
        assert not st.alive and "vanished" in st.plumbing_error, st
        # Its peers lost their ends towards it (r2's vxlan on node1 too) and say the link is pending.
        assert_healthy(lab)
        # A new sandbox gets every link back.
        assert lab.add_pod("r1").state == "up"
        assert_healthy(lab)


def test_gc_removes_what_is_no_longer_desired_and_leaves_foreign_interfaces(tmp_path: Path) -> None:
    with lab_up(tmp_path, THREE, nodes=2) as lab:  # r1, r3 on node0, r2 on node1
        r1 = lab.pod_netns("r1")
        ip("-n", r1, "link", "add", "own0", "type", "veth", "peer", "name", "own1")
        ip("-n", r1, "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789")
        lab.stop_daemon("node0", signal.SIGKILL)

        def drop_uid2(links: list[dict[str, Any]]) -> None:
            links[:] = [lnk for lnk in links if lnk["uid"] != 2]

        # uid 2 (r1:eth2 - r3:eth1, a veth on node0) is removed while node0 has no daemon to see it.
        lab.apply(write(tmp_path, "gc.yml", edit_manifest(edit_manifest(THREE, "r1", drop_uid2), "r3", drop_uid2)))
        assert "eth2" in lab.kernel_links(r1)
        lab.start_daemon("node0")
        lab.wait_daemon("node0")
        assert_healthy(lab, foreign={"r1": {"own0", "own1", "vx0"}})
        assert {"own0", "own1", "vx0"} <= set(lab.kernel_links(r1))


def test_every_parallel_link_to_a_pod_that_went_unseen_is_removed_in_one_pass(tmp_path: Path) -> None:
    """Two links between the same two pods (a LAG) leave two ends when the far pod goes while this
    node's daemon is down: the daemon's first pass after its start removes both (it removed one per
    pass, keyed by peer pod, and left the other until the next pass)."""
    text = mesh_manifest(["p1", "p2"], [("p1", "p2"), ("p1", "p2")], nodes={"p1": "node0", "p2": "node1"})
    with lab_up(tmp_path, text, nodes=2) as lab:
        p1 = lab.pod_netns("p1")
        assert {"e1", "e2"} <= set(lab.kernel_links(p1))
        lab.stop_daemon("node0", signal.SIGKILL)
        lab.del_pod("p2")  # its daemon cannot reach node0's: p1's two vxlan ends stay behind
        assert {"e1", "e2"} <= set(lab.kernel_links(p1))
        lab.start_daemon("node0")
        lab.wait_daemon("node0")  # ready after its first pass
        assert not {"e1", "e2"} & set(lab.kernel_links(p1))
        assert_healthy(lab)


def test_cni_gc_removes_pods_missing_from_valid_attachments(tmp_path: Path) -> None:
    with lab_up(tmp_path, THREE, nodes=2) as lab:  # r1, r3 on node0, r2 on node1
        recs = lab.state.pods
        valid = [{"containerID": recs["r1"].container_id, "ifname": "eth0"}]  # r3 is missing
        conf = {**lab.cni_config("node0"), "cniVersion": "1.1.0", protocol.VALID_ATTACHMENTS_KEY: valid}
        env = {"CNI_COMMAND": "GC", "CNI_PATH": ":".join(CNI_PLUGIN_DIRS), "PATH": os.environ.get("PATH", "")}
        proc = subprocess.run(lab.state.cni_bin, input=json.dumps(conf).encode(), env=env, capture_output=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout
        st = topologies(lab)[("default", "r3")].status
        assert (st.alive, st.container_id, st.links) == (False, "", ())
        assert set(lab.kernel_links(recs["r3"].netns)) == {"lo", "eth0"}
        recs["r3"].state = "collected"  # its sandbox still exists, but meshnet has let go of it
        # r1 (same node, listed) keeps its link to r2; r2 (other node) lost its vxlan to r3.
        assert_healthy(lab)
        assert set(lab.kernel_links(recs["r2"].netns)) == {"lo", "eth0", "eth1"}


def test_link_status_in_store_and_lab_status(tmp_path: Path) -> None:
    with lab_up(tmp_path, THREE, nodes=2) as lab:  # r1, r3 on node0, r2 on node1
        assert_converged(lab)  # includes: every link's status is up, with its kind and interface
        states = {(t.name, s.uid): (s.state, s.kind) for t in topologies(lab).values() for s in t.status.links}
        assert states == {("r1", 1): ("up", "vxlan"), ("r1", 2): ("up", "veth"), ("r2", 1): ("up", "vxlan"),
                          ("r2", 3): ("up", "vxlan"), ("r3", 2): ("up", "veth"), ("r3", 3): ("up", "vxlan")}
        lab.del_pod("r2")
        assert_converged(lab)  # includes: links towards r2 are pending
        topos = topologies(lab)
        pending = {(t.name, s.uid): s.message for t in topos.values() for s in t.status.links if s.state != "up"}
        assert set(pending) == {("r1", 1), ("r3", 3)} and all("r2" in m for m in pending.values()), pending
        links = {lk["uid"]: lk for lk in lab.status()["links"]}
        assert links[2]["status"] == {"r1": "up", "r3": "up"}
        assert links[1]["status"] == {"r1": "pending: peer pod r2 is not up yet"}
        # A peer daemon that cannot be reached: the link is in error, with the reason.
        lab.stop_daemon("node0", signal.SIGKILL)
        assert lab.add_pod("r2").state == "up"
        st = topologies(lab)[("default", "r2")].status
        errors = {s.uid: s for s in st.links if s.state == "error"}
        assert set(errors) == {1, 3} and "peer update failed" in errors[1].message, st
        assert "uid 1" in st.plumbing_error
        assert lab.status()["links"][0]["status"]["r2"].startswith("error: peer update failed")
        lab.start_daemon("node0")
        lab.wait_daemon("node0")
        assert_healthy(lab)
