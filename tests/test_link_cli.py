"""`meshnetctl link set` against a cluster: the Kubernetes API test server (tests/kubeapi) holds the
Topology; the command reads it with the user's kubeconfig, changes one end's spec and replaces it
(resourceVersion: a concurrent edit makes it read again, never overwrite). The lab and standalone
paths run against real daemons in tests/test_links_lab.py."""

from __future__ import annotations

from typing import Any

import pytest

from meshnet.cli import main
from meshnet.model import GROUP, PLURAL, VERSION
from tests.kubeapi.server import KubeApiServer


def _topology() -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Topology", "metadata": {"name": "r1", "namespace": "default"},
            "spec": {"links": [{"uid": 1, "peer_pod": "r2", "local_intf": "eth1", "peer_intf": "eth1",
                                "impairments": {"delay": "5ms"}},
                               {"uid": 2, "peer_pod": "r3", "local_intf": "eth2", "peer_intf": "eth1"}]}}


@pytest.fixture
def cluster(kube_api: KubeApiServer) -> KubeApiServer:
    import kubernetes

    kubernetes.client.CustomObjectsApi(kube_api.api_client()).create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, _topology())
    return kube_api


def _spec_links(kube_api: KubeApiServer) -> list[dict[str, Any]]:
    obj = kube_api.get_object(PLURAL, "default", "r1")
    assert obj is not None
    return list(obj["spec"]["links"])


def test_link_set_patches_the_topology_on_a_cluster(cluster: KubeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    kc = str(cluster.kubeconfig)
    assert main(["link", "set", "r1:eth1", "down", "--jitter", "1ms", "--rate", "10mbit", "--kubeconfig", kc]) == 0
    first, second = _spec_links(cluster)
    assert first["state"] == "down"
    assert first["impairments"] == {"delay": "5ms", "jitter": "1ms", "rate": "10mbit"}  # merged
    assert second == _topology()["spec"]["links"][1]  # the other link untouched
    assert "default/r1:eth1 (link uid 1): state down" in capsys.readouterr().out
    cluster.conflict_next(1, plural=PLURAL, name="r1")  # edited meanwhile: read again, then replace
    assert main(["link", "set", "r1:eth1", "up", "--clear", "--kubeconfig", kc]) == 0
    first, _ = _spec_links(cluster)
    assert first["state"] == "up" and "impairments" not in first


@pytest.mark.parametrize(("flags", "message"), [
    (["--delay=-5ms"], "link uid 1: impairments.delay: '-5ms' is negative"),
    (["--loss", "101%"], "link uid 1: impairments.loss: '101%' is more than 100%"),
    (["--rate", "0mbit"], "link uid 1: impairments.rate: '0mbit' is zero"),
    (["--delay", "20"], "link uid 1: impairments.delay: '20' is not a time"),
])
def test_bad_values_are_refused_naming_the_field_and_nothing_is_written(
        cluster: KubeApiServer, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    before = _spec_links(cluster)
    assert main(["link", "set", "r1:eth1", *flags, "--kubeconfig", str(cluster.kubeconfig)]) == 1
    err = capsys.readouterr().err
    assert "Topology default/r1" in err and message in err, err
    assert _spec_links(cluster) == before


def test_unknown_end_and_nothing_to_change_are_refused(cluster: KubeApiServer,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    kc = str(cluster.kubeconfig)
    assert main(["link", "set", "r1:eth7", "down", "--kubeconfig", kc]) == 1
    assert "Topology default/r1 has no link with local_intf eth7" in capsys.readouterr().err
    assert main(["link", "set", "r1:eth1", "--kubeconfig", kc]) == 1
    assert "nothing to change" in capsys.readouterr().err
    assert main(["link", "set", "r1", "down", "--kubeconfig", kc]) == 1
    assert "expected POD:INTF" in capsys.readouterr().err
