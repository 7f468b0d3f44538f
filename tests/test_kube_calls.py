"""Kubernetes API calls per pod on a concurrent start, counted by the API test server (issue 14,
item 2): at most 3 per pod, not growing with links per pod. The lab's real daemons, CNI shim and
kernel; the kube store against tests/kubeapi."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lab_bench import random_manifest
from meshnet.daemon.link_status import LinkStatusWriter
from tests.kubeapi.server import KubeApiServer
from tests.labkit import lab_up


def settled(server: KubeApiServer, quiet: float, limit: float = 60.0) -> None:
    """Until the API server has seen no request for `quiet` seconds (the daemons' reactions count)."""
    deadline = time.monotonic() + limit
    count, since = len(server.requests), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if len(server.requests) != count:
            count, since = len(server.requests), time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError(f"the daemons kept calling the API for {limit}s")


@pytest.mark.parametrize("links", [30, 60])
def test_a_concurrent_start_costs_at_most_3_api_calls_per_pod(tmp_path: Path, kube_api: KubeApiServer,
                                                              links: int) -> None:
    pods = 20
    with lab_up(tmp_path, random_manifest(pods, links, seed=11), nodes=3, store="kube",
                kubeconfig=kube_api.kubeconfig) as lab:
        names = list(lab.state.pods)
        for p in names:
            lab.del_pod(p, remove_netns=False)
        settled(kube_api, quiet=1.0)  # the reactions to the DELs are not counted
        kube_api.reset_counts()
        lab.add_pods(names)  # 8 at a time, as a kubelet would
        settled(kube_api, quiet=LinkStatusWriter.DAEMON_WINDOW + 0.5)  # gathered news included
        by_verb: dict[str, int] = {}
        for r in kube_api.requests:
            kind = "status" if r.path.endswith("/status") else "watch" if r.query.get("watch") else "object"
            by_verb[f"{r.method} {kind}"] = by_verb.get(f"{r.method} {kind}", 0) + 1
        total = sum(by_verb.values())
        assert total <= 3 * pods, f"{total / pods:.2f} calls per pod: {by_verb}"
        # ... and what those calls wrote is right: every link up, both ends recorded up.
        assert lab.wait_settled(10) == []
        status: dict[str, Any] = lab.status()
        assert len(status["links"]) == links
        wrong = [(lk["uid"], lk["state"], lk["status"]) for lk in status["links"]
                 if lk["state"] != "up" or set(lk["status"].values()) != {"up"} or len(lk["status"]) != 2]
        assert not wrong, wrong
