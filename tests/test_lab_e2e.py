"""End to end through the emulated lab: real namespaces, real meshnetd per node, the real CNI shim,
real `bridge`/`host-local` for eth0, real pings across every addressed link.

Every lab lives under the test's tmp_path and is torn down in `finally`; `down()` itself is checked
to leave nothing behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meshnet.lab.cluster import Lab
from meshnet.model import Manifest, load_manifest
from tests.labkit import lab_up
from tests.netns import list_netns
from tests.owned import Claim

pytestmark = pytest.mark.root

TESTS = Path(__file__).parent
SEEDS = ["2node", "3node", "5node", "macvlan", "3node-mlink", "2node-sts"]


def failed_pods(lab: Lab) -> dict[str, str]:
    return {r.name: r.error for r in lab.state.pods.values() if r.state != "up"}


def expected_kinds(lab: Lab, manifest: Manifest) -> dict[int, str]:
    """{uid: kind} from where the lab placed the pods: same node → veth, else vxlan; localhost → macvlan."""
    node = {p.name: p.node for p in lab.state.pods.values()}
    kinds: dict[int, str] = {}
    for t in manifest.topologies:
        for lnk in t.links:
            if lnk.is_macvlan:
                kinds[lnk.uid] = "macvlan" if t.name in node else ""
            elif t.name in node and lnk.peer_pod in node:
                kinds[lnk.uid] = "veth" if node[t.name] == node[lnk.peer_pod] else "vxlan"
    return kinds


def expected_pings(lab: Lab, manifest: Manifest) -> set[tuple[str, str]]:
    """(from, to) for every addressed link end whose pods both exist."""
    pods = set(lab.state.pods)
    want = set()
    for t in manifest.topologies:
        for lnk in t.links:
            if lnk.local_ip is None or t.name not in pods:
                continue
            if lnk.is_macvlan:
                want.add(("external", f"{t.name}:{lnk.local_intf}"))
            elif lnk.peer_pod in pods:
                want.add((f"{lnk.peer_pod}:{lnk.peer_intf}", f"{t.name}:{lnk.local_intf}"))
    return want


def assert_connected(lab: Lab) -> None:
    manifest = lab.manifest()
    status = lab.status()
    assert all(p["state"] == "up" for p in status["pods"]), status["pods"]
    kinds = expected_kinds(lab, manifest)
    built = {lk["uid"]: lk for lk in status["links"] if lk["state"] != "no-pod"}
    assert set(built) == {u for u, k in kinds.items() if k}
    for uid, lk in built.items():
        assert (lk["kind"], lk["state"]) == (kinds[uid], "up"), lk
    results = lab.connectivity()
    assert {(r["from"], r["to"]) for r in results} == expected_pings(lab, manifest)
    assert [r for r in results if not r["ok"]] == []


def interfaces(lab: Lab, pod: str) -> set[str]:
    return set(lab.kernel_links(lab.state.pods[pod].netns))


@pytest.mark.parametrize("nodes", [1, 3], ids=["veth", "vxlan"])
@pytest.mark.parametrize("seed", SEEDS)
def test_seed_topology_pings_end_to_end(tmp_path: Path, seed: str, nodes: int) -> None:
    with lab_up(tmp_path, str(TESTS / f"{seed}.yml"), nodes) as lab:
        assert failed_pods(lab) == {}
        assert_connected(lab)
        kinds = {lk["kind"] for lk in lab.status()["links"] if lk["state"] == "up"}
        if nodes == 1:
            assert "vxlan" not in kinds
        elif seed in ("3node", "3node-mlink", "2node-sts"):
            assert kinds == {"vxlan"}  # every pod on its own node


def test_pods_without_topology_have_only_lo_and_eth0(tmp_path: Path) -> None:
    with lab_up(tmp_path, str(TESTS / "2node.yml"), 1) as lab:
        assert "r4" in lab.state.pods and load_manifest(str(TESTS / "2node.yml")).topology("default", "r4") is None
        assert interfaces(lab, "r4") == {"lo", "eth0"}
        assert interfaces(lab, "r1") == {"lo", "eth0", "eth1"}
        # r3's Topology links to r4, but r3 has no pod: r4 stays untouched and the link is "no-pod".
        assert [lk["state"] for lk in lab.status()["links"] if lk["uid"] == 2] == ["no-pod"]


def test_3node_with_kube_store(tmp_path: Path, kube_api: Any) -> None:
    with lab_up(tmp_path, TESTS / "3node.yml", 3, store="kube", kubeconfig=kube_api.kubeconfig) as lab:
        assert failed_pods(lab) == {}
        assert_connected(lab)
        topo = kube_api.get_object("topologies", "default", "r1")
        assert topo is not None and topo["status"]["src_ip"] and topo["status"]["node"] == "node0"


def test_two_labs_side_by_side(tmp_path: Path) -> None:
    with lab_up(tmp_path, TESTS / "3node.yml", 3) as left, lab_up(tmp_path, TESTS / "3node.yml", 1) as right:
        assert left.prefix != right.prefix
        assert_connected(left)
        assert_connected(right)
        assert {lk["kind"] for lk in left.status()["links"]} == {"vxlan"}
        assert {lk["kind"] for lk in right.status()["links"]} == {"veth"}
        # Taking one down leaves the other working.
        right.down()
        assert [n for n in list_netns() if n.startswith(right.prefix)] == []
        assert_connected(left)


def test_pod_restart_keeps_connectivity(tmp_path: Path) -> None:
    with lab_up(tmp_path, str(TESTS / "3node.yml"), 3) as lab:
        old = lab.state.pods["r2"].container_id
        rec = lab.restart_pod("r2")
        assert (rec.state, rec.error) == ("up", "")
        assert rec.container_id != old
        assert_connected(lab)


def test_pod_restart_on_one_node_keeps_connectivity(tmp_path: Path) -> None:
    with lab_up(tmp_path, str(TESTS / "5node.yml"), 1) as lab:
        assert lab.restart_pod("r5").state == "up"
        assert_connected(lab)


def test_daemon_restart_keeps_connectivity(tmp_path: Path) -> None:
    with lab_up(tmp_path, str(TESTS / "3node.yml"), 3) as lab:
        before = lab.state.daemons["node1"]
        lab.restart_daemon("node1")
        assert lab.state.daemons["node1"] != before
        assert_connected(lab)
        # The restarted daemon serves the next pod restart on its node.
        assert lab.restart_pod("r2").state == "up"
        assert_connected(lab)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            zombie = (entry / "stat").read_text().split(") ", 1)[1][:1] == "Z"
        except OSError:
            continue
        if text in cmdline and not zombie:
            pids.append(int(entry.name))
    return pids


def test_down_leaves_nothing_behind(tmp_path: Path) -> None:
    lab = Lab(f"d{os.getpid() % 100000}", root=tmp_path)
    claim = Claim(lab.name, lab.dir)  # released once nothing is left: else the next cleanup reaps it
    try:
        lab.up(str(TESTS / "macvlan.yml"), 3)
        pids = list(lab.state.daemons.values())
        attached = [ns for ns in list_netns() if ns.startswith(lab.prefix)]
        assert len(attached) >= 3 + 2 + 2  # nodes, pods, underlay, external
        assert all(_processes_mentioning(f"--node-name {n} ") for n in lab.state.nodes)
    finally:
        problems = lab.down()
    assert problems == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert lab.prefix not in listed
    assert not list(Path("/var/run/netns").glob(f"{lab.prefix}*"))
    assert [p for p in _processes_mentioning(str(lab.dir)) if p in pids] == []
    assert _processes_mentioning(str(lab.dir)) == []
    assert not lab.dir.exists()
    assert list(tmp_path.iterdir()) == []
    claim.release()
