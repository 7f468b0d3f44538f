"""Forged statuses (tests/bad/status/*.yml, plus huge values made here) as an attacker who holds
one node's service account would write them: each is parsed as "pod not alive" with a problem
naming the pod and the field, the forged value is dropped, no store's list() raises, and no
rendered command ever carries it. The CRD's status schema is checked against the same corpus in
tests/test_manifests.py.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshnet import render
from meshnet.model import Link, Topology, TopologyStatus, parse_topology
from meshnet.plan import NodeInfo, PodState, plan_pod
from meshnet.store.sqlite import SqliteStore
from tests.bad.status import make_corpus

CORPUS = sorted((Path(__file__).parent / "bad" / "status").glob("*.yml"))
R1 = Topology("r1", "default", (Link(1, "r2", "eth1", "eth1"),))
NODE0 = NodeInfo("node0", "198.51.100.1", "eth0", "mnt-node0")
NODE1 = NodeInfo("node1", "198.51.100.2", "eth0", "mnt-node1")


def load(path: Path) -> tuple[dict[str, Any], str, str]:
    text = path.read_text()
    head = dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("# ") and ": " in line)
    (doc,) = [d for d in yaml.safe_load_all(text) if d]
    return doc, head["expect"], head["object"]


def huge_cases() -> dict[str, tuple[str, dict[str, Any]]]:
    mb = 1 << 20
    return {
        "src-ip-megabyte": ("status.src_ip", {"src_ip": "1" * mb}),
        "net-ns-megabyte": ("status.net_ns", {"net_ns": "/var/run/netns/" + "a" * mb}),
        "net-ns-name-64": ("status.net_ns", {"net_ns": "/var/run/netns/" + "a" * 64}),
        "container-id-256": ("status.container_id", {"container_id": "a" * 256}),
        "node-254": ("status.node", {"node": "a" * 254}),
        "plumbing-error-4097": ("status.plumbing_error", {"plumbing_error": "x" * 4097}),
        "message-megabyte": ("status.links[0].message",
                             {"links": [{"uid": 1, "kind": "veth", "state": "error", "message": "x" * mb}]}),
        "links-4097": ("status.links", {"links": [{"uid": 1, "kind": "veth", "state": "up"}] * 4097}),
        "skipped-4097": ("status.skipped", {"skipped": [{"pod_name": "r1", "link_id": 1}] * 4097}),
    }


def forged_documents() -> Iterator[tuple[str, dict[str, Any], str]]:
    for path in CORPUS:
        doc, expect, _ = load(path)
        yield path.stem, doc, expect
    for name, (expect, forged) in huge_cases().items():
        doc = yaml.safe_load(make_corpus.document("src-ip-option").split("---\n", 1)[1])
        doc["status"] = {**make_corpus.GOOD, **forged}
        yield name, doc, expect


FORGED = list(forged_documents())
IDS = [name for name, _, _ in FORGED]


def test_corpus_files_are_current_and_large_enough() -> None:
    assert len(CORPUS) >= 60
    for path in CORPUS:
        assert path.read_text() == make_corpus.document(path.stem), f"{path.name}: run tests/bad/status/make_corpus.py"


def test_canary_the_honest_status_is_alive() -> None:
    doc = yaml.safe_load(make_corpus.document("src-ip-option").split("---\n", 1)[1])
    doc["status"] = dict(make_corpus.GOOD)
    status = parse_topology(doc).status
    assert status.alive and status.problems == ()
    assert status.to_api() == make_corpus.GOOD
    assert TopologyStatus.from_api(status.to_api()) == status


@pytest.mark.parametrize(("name", "doc", "expect"), FORGED, ids=IDS)
def test_forged_status_is_not_alive_and_names_pod_and_field(name: str, doc: dict[str, Any], expect: str) -> None:
    started = time.monotonic()
    topo = parse_topology(doc)  # never raises for a status
    assert time.monotonic() - started < 0.5, "parsing a forged status must stay cheap"
    st = topo.status
    assert not st.alive
    assert any(p.startswith(f"Topology default/r2: {expect}: ") for p in st.problems), st.problems
    assert all(len(p) < 1000 for p in st.problems), "a problem quotes a bounded part of the value"
    forged = doc["status"] if isinstance(doc["status"], dict) else {}
    for key in forged:
        if forged[key] != make_corpus.GOOD.get(key):
            assert getattr(st, key) == getattr(TopologyStatus(), key), f"forged {key} was kept"


@pytest.mark.parametrize(("name", "doc", "expect"), FORGED, ids=IDS)
@pytest.mark.parametrize("node", [NODE0, NODE1], ids=["vxlan", "veth"])
def test_forged_status_never_reaches_a_command(name: str, doc: dict[str, Any], expect: str, node: NodeInfo) -> None:
    r2 = parse_topology(doc)
    peers = {"r2": PodState.from_topology(r2, "mnt-r2")}
    plan = plan_pod(R1, "mnt-r1", node, peers)
    assert plan.links == () and plan.remote == ()
    (pending,) = plan.pending
    # What the daemon writes as the link's status message: the pod and the field.
    assert f"peer pod r2's status is refused: Topology default/r2: {expect}: " in pending.reason


def _raw_status(doc: dict[str, Any]) -> str:
    return json.dumps(doc["status"])


def test_sqlite_list_and_get_never_raise_on_forged_or_corrupt_status(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        store.apply(R1)
        store.apply(Topology("r2", "default", (Link(1, "r1", "eth1", "eth1"),)))
        forged = [*(_raw_status(doc) for _, doc, _ in FORGED), "{", "[1, 2]", "null", '"alive"', "[" * 100000]
        db = sqlite3.connect(tmp_path / "s.db")
        for text in forged:
            with db:
                db.execute("UPDATE topology SET status = ? WHERE name = 'r2'", (text,))
            listed = {t.name: t for t in store.list()}
            assert set(listed) == {"r1", "r2"}
            got = store.get("default", "r2")
            assert got is not None
            if text != "null":
                assert not listed["r2"].status.alive and not got.status.alive, text[:80]
                assert all(p.startswith("Topology default/r2: status") for p in got.status.problems)
        db.close()
    finally:
        store.close()


def test_kube_list_never_raises_on_forged_status(kube_api: Any) -> None:
    from meshnet.model import GROUP, PLURAL, VERSION
    from meshnet.store.kube import KubeStore

    store = KubeStore(kube_api.api_client(), qps=10_000, burst=10_000)
    try:
        store.apply(R1)
        store.apply(Topology("r2", "default", (Link(1, "r1", "eth1", "eth1"),)))
        import kubernetes

        crd = kubernetes.client.CustomObjectsApi(kube_api.api_client())
        for name, doc, expect in FORGED[:: max(1, len(FORGED) // 20)]:  # a spread of fields, quickly
            current = crd.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "r2")
            body = {"apiVersion": current["apiVersion"], "kind": current["kind"], "metadata": current["metadata"],
                    "spec": current["spec"], "status": doc["status"]}
            crd.replace_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "r2", body)
            listed = {t.name: t for t in store.list()}
            assert set(listed) == {"r1", "r2"}, name
            assert not listed["r2"].status.alive, name
            assert any(f"{expect}: " in p for p in listed["r2"].status.problems), (name, listed["r2"].status.problems)
    finally:
        store.close()


def test_rendered_plans_of_an_honest_peer_still_build(tmp_path: Path) -> None:
    """Canary for the never-reaches test: with the honest status the same link is planned and rendered."""
    doc = yaml.safe_load(make_corpus.document("src-ip-option").split("---\n", 1)[1])
    doc["status"] = dict(make_corpus.GOOD)
    plan = plan_pod(R1, "mnt-r1", NODE0, {"r2": PodState.from_topology(parse_topology(doc), "mnt-r2")})
    (vxlan,) = plan.links
    commands = render.render(plan.links, "add")
    assert any("198.51.100.2" in c.argv for c in commands) and vxlan.remote_ip == "198.51.100.2"
