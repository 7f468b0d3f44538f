"""Kubernetes API calls per pod on a concurrent start, counted by the API test server (issue 14,
item 2): at most 3 per pod, not growing with links per pod. The lab's real daemons, CNI shim and
kernel; the kube store against tests/kubeapi."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lab_bench import random_manifest
from meshnet.daemon.link_status import LinkStatusWriter
from tests.kubeapi.server import KubeApiServer
from tests.labkit import lab_up

TESTS = Path(__file__).parent


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


def test_lab_up_waits_for_the_status_and_names_what_did_not_settle(tmp_path: Path) -> None:
    """`lab up` returns once every link's two ends are recorded in the store; what does not settle
    within the wait is named (pod, uid, recorded state), not waited for forever."""
    from meshnet.model import LinkStatus, TopologyStatus
    from meshnet.store import open_store

    with lab_up(tmp_path, TESTS / "3node.yml", nodes=2) as lab:
        assert lab.reports.unsettled() == []  # up waited for it
        for node in list(lab.state.nodes):  # nobody writes the status any more
            lab.stop_daemon(node)
        store = open_store(lab.state.store_url)
        try:
            def pending(cur: Any) -> TopologyStatus:
                links = tuple(LinkStatus(s.uid, "", "pending", "peer pod r3 is not up yet") if s.uid == 3 else s
                              for s in cur.status.links)
                return replace(cur.status, links=links)

            store.update_status("default", "r2", pending)
        finally:
            store.close()
        said: list[str] = []
        lab._progress = said.append
        started = time.monotonic()
        assert lab.wait_settled(0.5) == ["default/r2 uid 3: pending: peer pod r3 is not up yet"]
        assert time.monotonic() - started < 5
        assert len(said) == 1 and "default/r2 uid 3" in said[0] and "lab status" in said[0], said
