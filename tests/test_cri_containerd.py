"""containerd's CRI plugin drives meshnet as on a Kubernetes node (issue 13, item 6).

One lab (3 nodes, tests/3node.yml's Topologies in the store, a meshnetd per node, no pods) and one
containerd per node for the whole module (tests/crikit.py); every test starts from no sandbox and
leaves none: the `pods` fixture stops and removes what a test ran and checks that the sandboxes'
namespaces and host-local leases are gone.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from meshnet.lab.kubelet import POD_SUBNET
from tests.cri import api_pb2 as cri
from tests.crikit import CriCluster, Pods, Sandbox, addresses, cri_cluster, tracked_pods

pytestmark = [pytest.mark.root, pytest.mark.slow]

TRIANGLE = {"r1": "node0", "r2": "node1", "r3": "node2"}  # every link a VXLAN
# What each pod of tests/3node.yml must hold besides eth0 and lo.
EXPECTED = {"r1": {"eth1": "12.12.12.1", "eth2": "13.13.13.1"},
            "r2": {"eth1": "12.12.12.2", "eth2": "23.23.23.2"},
            "r3": {"eth1": "13.13.13.3", "eth2": "23.23.23.3"}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[CriCluster]:
    with cri_cluster("tests/3node.yml", nodes=3) as c:
        yield c


@pytest.fixture
def pods(cluster: CriCluster) -> Iterator[Pods]:
    with tracked_pods(cluster) as p:
        yield p


def assert_triangle(cluster: CriCluster, sbs: dict[str, Sandbox]) -> None:
    for name, sb in sbs.items():
        got = addresses(cluster, sb)
        assert ipaddress.ip_address(got["eth0"]) in ipaddress.ip_network(POD_SUBNET), (name, got)
        assert {k: v for k, v in got.items() if k not in ("eth0", "lo")} == EXPECTED[name], name
        status, _info = cluster.status(sb)
        assert status.state == cri.SANDBOX_READY
        assert status.network.ip == got["eth0"], "containerd reports the IP of the CNI result"
    assert cluster.failed_pings(list(sbs.values())) == []


def run_triangle(pods: Pods, attempt: int = 0) -> dict[str, Sandbox]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        started = pool.map(lambda item: pods.run(item[0], item[1], attempt=attempt), TRIANGLE.items())
        return {sb.name: sb for sb in started}


@pytest.mark.parametrize("mode", ["chain", "delegate"])
def test_triangle_every_link_pings(cluster: CriCluster, pods: Pods, mode: str) -> None:
    cluster.set_mode(mode)
    sbs = run_triangle(pods)
    assert_triangle(cluster, sbs)
    assert {s.metadata.name for node in cluster.runtimes for s in cluster.list(node)} == set(TRIANGLE)
    for sb in sbs.values():
        pods.remove(sb)
        assert not sb.netns_path.exists(), f"{sb.name}: containerd removes the sandbox's namespace"


def test_stop_and_rerun_a_pod_gets_a_new_sandbox(cluster: CriCluster, pods: Pods) -> None:
    cluster.set_mode("chain")
    sbs = run_triangle(pods)
    old = sbs["r1"]
    pods.remove(old)
    # r1's DELs (stop, then remove) took its links down; the peers lose their ends of them.
    assert "eth1" not in cluster.links(sbs["r2"]) and "eth1" not in cluster.links(sbs["r3"])
    sbs["r1"] = pods.run("r1", "node0", uid=old.uid, attempt=1)
    assert sbs["r1"].id != old.id and sbs["r1"].netns != old.netns
    assert_triangle(cluster, sbs)


def test_dead_sandbox_replaced_before_it_is_removed(cluster: CriCluster, pods: Pods) -> None:
    """A kubelet that finds a sandbox dead runs the new one first and only then stops and removes
    the old one: the old sandbox's DELs must not undo the new sandbox's ADD."""
    cluster.set_mode("chain")
    sbs = run_triangle(pods)
    old = sbs["r1"]
    _status, info = cluster.status(old)
    os.kill(int(info["pid"]), signal.SIGKILL)  # the pause process: the sandbox is dead
    deadline = time.monotonic() + 30
    while cluster.status(old)[0].state != cri.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, "containerd did not notice the dead sandbox"
        time.sleep(0.1)
    sbs["r1"] = pods.run("r1", "node0", uid=old.uid, attempt=1)
    assert_triangle(cluster, sbs)
    pods.remove(old)
    assert_triangle(cluster, sbs)


def test_sandboxes_started_and_removed_in_parallel(cluster: CriCluster, pods: Pods) -> None:
    cluster.set_mode("delegate")
    plain = {f"plain{i}": f"node{i % 3}" for i in range(6)}
    wanted = {**TRIANGLE, **plain}
    with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        sbs = {sb.name: sb for sb in pool.map(lambda item: pods.run(*item), wanted.items())}
    assert_triangle(cluster, {n: sbs[n] for n in TRIANGLE})
    ips = [addresses(cluster, sb)["eth0"] for sb in sbs.values()]
    for node in cluster.runtimes:  # host-local leases per node: one per sandbox there
        assert len(cluster.leases(node)) == sum(1 for n in wanted.values() if n == node)
    assert all(ips), ips
    with ThreadPoolExecutor(max_workers=len(sbs)) as pool:
        list(pool.map(pods.remove, list(sbs.values())))


@pytest.mark.parametrize("mode", ["chain", "delegate"])
def test_pod_without_topology_gets_eth0_only(cluster: CriCluster, pods: Pods, mode: str) -> None:
    cluster.set_mode(mode)
    sb = pods.run("plain", "node1", namespace="kube-system")
    got = addresses(cluster, sb)
    assert sorted(got) == ["eth0", "lo"]
    assert ipaddress.ip_address(got["eth0"]) in ipaddress.ip_network(POD_SUBNET)
    assert cluster.leases("node1") == [got["eth0"]]
