"""containerd with the node's meshnetd down (issue 13, item 6; behaviour of items 1 and 2).

- StopPodSandbox and RemovePodSandbox succeed while meshnetd is down, and host-local's lease of the
  pod's eth0 is freed (chain mode: the runtime goes on to bridge/host-local's DEL; delegate mode:
  the shim runs the delegate's DEL itself).
- RunPodSandbox of a pod with a Topology fails with CNI error 11 while it is down and succeeds on
  a retry once it is back; a pod without a Topology starts at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.crikit import CriCluster, Pods, addresses, cri_cluster, tracked_pods

# Issue 13's items 1 (DEL completes without the daemon) and 2 (pods without a Topology are
# answered from the node-local index), as a kubelet meets them through containerd.
pytestmark = [pytest.mark.root, pytest.mark.slow]

NODE = "node0"


@pytest.fixture(scope="module")
def cluster() -> Iterator[CriCluster]:
    with cri_cluster("tests/3node.yml", nodes=3) as c:
        yield c


@pytest.fixture
def pods(cluster: CriCluster) -> Iterator[Pods]:
    with tracked_pods(cluster) as p:
        yield p


@pytest.fixture
def daemon_down(cluster: CriCluster) -> Iterator[None]:
    """NODE's meshnetd stopped for the test; running again afterwards, whatever happened."""
    lab = cluster.lab
    lab.stop_daemon(NODE)
    try:
        yield
    finally:
        if NODE not in lab.state.daemons:
            lab.start_daemon(NODE)
            lab.wait_daemon(NODE)


def daemon_back(cluster: CriCluster) -> None:
    cluster.lab.start_daemon(NODE)
    cluster.lab.wait_daemon(NODE)


@pytest.mark.parametrize("mode", ["chain", "delegate"])
@pytest.mark.parametrize("pod", ["r1", "plain"])
def test_stop_and_remove_while_the_daemon_is_down(cluster: CriCluster, pods: Pods, mode: str, pod: str) -> None:
    cluster.set_mode(mode)
    sb = pods.run(pod, NODE)
    ip = addresses(cluster, sb)["eth0"]
    assert cluster.leases(NODE) == [ip]
    cluster.lab.stop_daemon(NODE)
    try:
        pods.remove(sb)  # StopPodSandbox (DEL with netns and prevResult), RemovePodSandbox (DEL again)
        assert not sb.netns_path.exists()
        assert cluster.leases(NODE) == [], "host-local's lease of eth0 is freed without meshnetd"
    finally:
        daemon_back(cluster)


@pytest.mark.parametrize("mode", ["chain", "delegate"])
def test_add_with_a_topology_waits_for_the_daemon(cluster: CriCluster, pods: Pods, daemon_down: None,
                                                  mode: str) -> None:
    cluster.set_mode(mode)
    with pytest.raises(grpc.RpcError) as failed:
        pods.run("r1", NODE)
    assert "meshnetd is not reachable" in str(failed.value.details())
    # containerd cleaned the failed sandbox up (its DEL after the failed ADD succeeded).
    assert cluster.list(NODE) == []
    assert cluster.leases(NODE) == []
    daemon_back(cluster)
    sb = pods.run("r1", NODE, attempt=1)  # a kubelet's retry
    # r1's links wait for its peers; their ADDs build r1's ends too (peer calls to NODE's daemon).
    pods.run("r2", "node1")
    pods.run("r3", "node2")
    assert {"eth1", "eth2"} <= set(addresses(cluster, sb))


@pytest.mark.parametrize("mode", ["chain", "delegate"])
def test_add_without_a_topology_needs_no_daemon(cluster: CriCluster, pods: Pods, daemon_down: None,
                                                mode: str) -> None:
    cluster.set_mode(mode)
    sb = pods.run("plain", NODE)
    assert sorted(addresses(cluster, sb)) == ["eth0", "lo"]
