"""`meshnetctl topo create|destroy` against the Kubernetes API test server (real `kubernetes` client)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshnet.cli import main
from meshnet.model import PLURAL
from meshnet.topo import kube
from meshnet.topo.builder import build, render
from tests.kubeapi.server import KubeApiServer

TOPO = "/apis/networkop.co.uk/v1beta1/namespaces/{ns}/topologies"
PODS = "/api/v1/namespaces/{ns}/pods"


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "five.yml"
    path.write_text(render(build(5, 6, seed=3)))
    return path


@contextmanager
def kubelet(server: KubeApiServer, names: list[str], phase: str = "Running", after: float = 0.3,
            ns: str = "default") -> Iterator[None]:
    """Plays the kubelet from a thread: once each pod exists, sets its phase (one by one)."""
    stop = threading.Event()

    def run() -> None:
        pending = list(names)
        while pending and not stop.is_set():
            time.sleep(after / len(names))
            if server.get_object("pods", ns, pending[0]) is not None:
                server.set_pod_phase(ns, pending.pop(0), phase)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _pod_names(server: KubeApiServer, ns: str = "default") -> list[str]:
    return sorted(p["metadata"]["name"] for p in server.list_objects("pods", ns))


def test_create_makes_topologies_first_then_pods_with_init_wait_and_waits_for_running(
        kube_api: KubeApiServer, manifest: Path) -> None:
    objects = kube.load(manifest, init_image="registry.example/meshnet:1")
    lines: list[str] = []
    client = kube_api.api_client()
    names = [f"qrtr-{i}" for i in range(1, 6)]
    with kubelet(kube_api, names, after=1.0):
        summary = kube.create(objects, client, timeout=20, poll=0.05, progress=lines.append)
    assert summary["pods"] == 5 and summary["topologies"] == 5 and summary["pods created"] == 5
    assert summary["seconds"] >= 0.5  # it waited for the kubelet
    posts = [r.path for r in kube_api.requests if r.method == "POST"]
    assert posts == [TOPO.format(ns="default")] * 5 + [PODS.format(ns="default")] * 5
    assert _pod_names(kube_api) == sorted(names)
    assert len(kube_api.list_objects(PLURAL, "default")) == 5
    for t in objects.topologies:
        name = t["metadata"]["name"]
        pod = kube_api.get_object("pods", "default", name)
        assert pod is not None
        init = pod["spec"]["initContainers"]
        assert init == [{"name": "meshnet-init-wait", "image": "registry.example/meshnet:1",
                         "imagePullPolicy": "IfNotPresent",
                         "command": ["meshnetctl", "init-wait", str(len(t["spec"]["links"]) + 1)]}]
        assert pod["status"]["phase"] == "Running"
    assert lines[-1] == "pods Running: 5/5"
    assert any(line.startswith("pods Running: 0/5 (waiting for default/qrtr-1") for line in lines)


def test_create_again_is_harmless_and_namespace_overrides(kube_api: KubeApiServer, manifest: Path) -> None:
    client = kube_api.api_client()
    names = [f"qrtr-{i}" for i in range(1, 6)]
    objects = kube.load(manifest, namespace="lab7")
    with kubelet(kube_api, names, ns="lab7"):
        kube.create(objects, client, timeout=20, poll=0.05)
    again = kube.create(objects, client, timeout=5, poll=0.05)
    assert again["topologies unchanged"] == 5 and again["pods exists"] == 5
    assert _pod_names(kube_api, "default") == [] and _pod_names(kube_api, "lab7") == sorted(names)


def test_create_timeout_names_the_pods_that_are_not_running(kube_api: KubeApiServer, manifest: Path) -> None:
    client = kube_api.api_client()
    with kubelet(kube_api, ["qrtr-1", "qrtr-2"]), \
            pytest.raises(kube.TopoKubeError, match=r"timed out after 1s: 3 of 5 pods are not Running: "
                                                    r"default/qrtr-3 Pending, default/qrtr-4 Pending"):
        kube.create(kube.load(manifest), client, timeout=1, poll=0.05)


def test_create_stops_at_a_failed_pod(kube_api: KubeApiServer, manifest: Path) -> None:
    with kubelet(kube_api, ["qrtr-2"], phase="Failed"), \
            pytest.raises(kube.TopoKubeError, match=r"pod\(s\) failed: default/qrtr-2"):
        kube.create(kube.load(manifest), kube_api.api_client(), timeout=20, poll=0.05)


def test_api_errors_are_named_by_object(kube_api: KubeApiServer, manifest: Path) -> None:
    kube_api.fail_next(1, 403, method="POST")
    with pytest.raises(kube.TopoKubeError, match=r"create Topology default/qrtr-1: API server answered 403"):
        kube.create(kube.load(manifest), kube_api.api_client(), timeout=5)


def test_destroy_deletes_pods_waits_until_gone_then_topologies(kube_api: KubeApiServer, manifest: Path) -> None:
    client = kube_api.api_client()
    objects = kube.load(manifest)
    with kubelet(kube_api, [f"qrtr-{i}" for i in range(1, 6)]):
        kube.create(objects, client, timeout=20, poll=0.05)
    kube_api.pod_delete_delay = 1.0
    kube_api.reset_counts()
    lines: list[str] = []
    summary = kube.destroy(objects, client, timeout=20, poll=0.05, progress=lines.append)
    assert summary["pods deleted"] == 5 and summary["topologies deleted"] == 5
    assert summary["seconds"] >= 0.9  # the pods' grace period
    assert _pod_names(kube_api) == [] and kube_api.list_objects(PLURAL, "default") == []
    deletes = [r.path.rsplit("/", 2)[-2] for r in kube_api.requests if r.method == "DELETE"]
    assert deletes == ["pods"] * 5 + ["topologies"] * 5
    assert any(line.startswith("pods still there: 5/5") for line in lines)
    # Destroying what is gone already is fine.
    assert kube.destroy(objects, client, timeout=5, poll=0.05)["pods deleted"] == 0


def test_destroy_timeout_is_a_clear_error(kube_api: KubeApiServer, manifest: Path) -> None:
    client = kube_api.api_client()
    objects = kube.load(manifest)
    with kubelet(kube_api, [f"qrtr-{i}" for i in range(1, 6)]):
        kube.create(objects, client, timeout=20, poll=0.05)
    kube_api.pod_delete_delay = 30.0
    with pytest.raises(kube.TopoKubeError, match=r"timed out after 0.5s: 5 pods still exist: default/qrtr-1"):
        kube.destroy(objects, client, timeout=0.5, poll=0.05)
    assert len(kube_api.list_objects(PLURAL, "default")) == 5  # Topologies stay while their pods do


def test_cli_create_and_destroy(kube_api: KubeApiServer, manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(kube_api.kubeconfig)
    with kubelet(kube_api, [f"qrtr-{i}" for i in range(1, 6)]):
        assert main(["topo", "create", str(manifest), "--kubeconfig", cfg, "--timeout", "20"]) == 0
    out = capsys.readouterr()
    assert "5 pods Running, 5 Topologies" in out.out and "pods Running: 5/5" in out.err
    assert main(["topo", "destroy", str(manifest), "--kubeconfig", cfg, "--timeout", "20"]) == 0
    assert "deleted 5 pods and 5 Topologies" in capsys.readouterr().out
    assert _pod_names(kube_api) == []


def test_cli_timeout_exits_1_with_a_message(kube_api: KubeApiServer, manifest: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["topo", "create", str(manifest), "--kubeconfig", str(kube_api.kubeconfig), "--timeout", "0.3"]
    assert main(argv) == 1
    assert "meshnetctl topo create: timed out after 0.3s: 5 of 5 pods are not Running" in capsys.readouterr().err


def test_only_pods_and_topologies_are_created(tmp_path: Path) -> None:
    path = tmp_path / "sts.yml"
    path.write_text("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: r1}\nspec: {replicas: 1}\n")
    with pytest.raises(kube.TopoKubeError, match="only Pod and Topology documents"):
        kube.load(path)
