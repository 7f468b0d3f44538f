"""What only the Kubernetes store promises: retries, error mapping, call counting, rate limiting,
the status subresource, watch recovery. Driven through the real client against the API test server."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from meshnet.model import Link, Topology, TopologyStatus
from meshnet.store import StoreConflict, StoreInvalid, StoreUnavailable, open_store
from meshnet.store import kube as kube_store
from meshnet.store.kube import KubeStore, TokenBucket
from tests.kubeapi import KubeApiServer, fixtures

# Until the project's conftest imports it, the fixture is taken from its module here.
kube_api = fixtures.kube_api

BASE = "/apis/networkop.co.uk/v1beta1"
R1 = f"{BASE}/namespaces/default/topologies/r1"


def topo(name: str, namespace: str = "default") -> Topology:
    return Topology(name, namespace, (Link(1, "r2", "eth1", "eth1"),))


def bump(current: Topology) -> TopologyStatus:
    return replace(current.status, container_id=str(int(current.status.container_id or "0") + 1))


@pytest.fixture
def store(kube_api: KubeApiServer) -> Iterator[KubeStore]:
    opened = KubeStore(kube_api.api_client(), qps=10_000, burst=10_000)
    yield opened
    opened.close()


def test_status_goes_through_the_status_subresource(kube_api: KubeApiServer, store: KubeStore) -> None:
    store.apply(topo("r1"))
    kube_api.reset_counts()
    updated = store.update_status("default", "r1",
                                  lambda t: TopologyStatus(src_ip="198.51.100.1", net_ns="/run/netns/n"))
    assert [(r.method, r.path) for r in kube_api.requests] == [("GET", R1), ("PUT", f"{R1}/status")]
    assert updated is not None and updated.status.src_ip == "198.51.100.1"
    stored = kube_api.get_object("topologies", "default", "r1")
    assert stored is not None and stored["status"] == {"src_ip": "198.51.100.1", "net_ns": "/run/netns/n"}


def test_apply_of_an_existing_topology_replaces_the_main_resource(kube_api: KubeApiServer, store: KubeStore) -> None:
    store.apply(topo("r1"))
    store.update_status("default", "r1", lambda t: TopologyStatus(src_ip="198.51.100.1", net_ns="/run/netns/n"))
    kube_api.reset_counts()
    changed = store.apply(Topology("r1", "default", (Link(1, "r2", "eth1", "eth2"),)))
    assert [(r.method, r.path) for r in kube_api.requests] == [
        ("POST", f"{BASE}/namespaces/default/topologies"), ("GET", R1), ("PUT", R1)]
    assert changed.links[0].peer_intf == "eth2"
    assert changed.status.src_ip == "198.51.100.1"


def test_conflicts_are_retried(kube_api: KubeApiServer, store: KubeStore) -> None:
    store.apply(topo("r1"))
    kube_api.conflict_next(3, name="r1")
    kube_api.reset_counts()
    calls: list[str] = []

    def counted(current: Topology) -> TopologyStatus:
        calls.append(current.resource_version)
        return bump(current)

    updated = store.update_status("default", "r1", counted)
    assert updated is not None and updated.status.container_id == "1"
    assert kube_api.count("PUT", f"{R1}/status") == 4
    assert kube_api.count("GET", R1) == 4  # re-read after every conflict
    assert len(calls) == 4


def test_conflicts_past_the_retries_raise(kube_api: KubeApiServer, store: KubeStore,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_store, "_backoff", lambda attempt: None)
    store.apply(topo("r1"))
    kube_api.conflict_next(10_000, name="r1")
    with pytest.raises(StoreConflict, match="r1"):
        store.update_status("default", "r1", bump)
    assert kube_api.count("PUT", f"{R1}/status") == kube_store.CAS_TRIES


def test_not_found_is_none(kube_api: KubeApiServer, store: KubeStore) -> None:
    assert store.get("default", "r1") is None
    assert store.delete("default", "r1") is False
    assert store.update_status("default", "r1", bump) is None
    assert kube_api.count("GET", R1) == 2 and kube_api.count("DELETE", R1) == 1


@pytest.mark.parametrize("code", [500, 503, 429])
def test_server_errors_are_unavailable(kube_api: KubeApiServer, store: KubeStore, code: int) -> None:
    kube_api.fail_next(1, code)
    with pytest.raises(StoreUnavailable, match=f"injected failure \\({code}\\)"):
        store.get("default", "r1")
    assert store.get("default", "r1") is None  # the next call goes through


def test_invalid_is_refused_with_the_server_message(kube_api: KubeApiServer, store: KubeStore) -> None:
    kube_api.fail_next(1, 422, method="POST")
    with pytest.raises(StoreInvalid, match="injected failure \\(422\\)"):
        store.apply(topo("r1"))


def test_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    with KubeApiServer() as gone:
        kubeconfig = gone.write_kubeconfig(tmp_path / "kubeconfig")
    store = KubeStore(kubeconfig=kubeconfig)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.get("default", "r1")
    store.close()


def test_api_calls_are_counted(kube_api: KubeApiServer, store: KubeStore) -> None:
    kube_api.reset_counts()
    store.apply(topo("r1"))  # create: 1
    store.get("default", "r1")  # 1
    store.update_status("default", "r1", bump)  # get + put: 2
    store.update_status("default", "r1", lambda t: None)  # get only: 1
    store.list()  # 1
    store.delete("default", "r1")  # 1
    assert store.api_calls == 7 == len(kube_api.requests)


def test_a_fresh_known_copy_saves_the_get(kube_api: KubeApiServer, store: KubeStore) -> None:
    stored = store.apply(topo("r1"))
    kube_api.reset_counts()
    before = store.api_calls
    written = store.update_status("default", "r1", bump, known=stored)  # put only: 1
    store.update_status("default", "r1", lambda t: None, known=written)  # no-change verdict confirmed: get
    store.update_status("default", "r1", bump, known=stored)  # stale: put 409, get, put: 3
    assert [r.method for r in kube_api.requests] == ["PUT", "GET", "PUT", "GET", "PUT"]
    assert store.api_calls - before == 5


def test_rate_limit_is_honoured(kube_api: KubeApiServer) -> None:
    store = KubeStore(kube_api.api_client(), qps=20, burst=2)
    started = time.monotonic()
    for _ in range(10):
        store.get("default", "r1")
    elapsed = time.monotonic() - started
    # 2 calls from the burst, 8 more at 20 per second
    assert elapsed >= 8 / 20 - 0.02
    assert store.api_calls == 10
    store.close()


def test_token_bucket_refills_up_to_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(qps=10, burst=3, clock=lambda: now[0])
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    now[0] = 10.0  # a long pause refills to `burst`, not beyond
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.acquire() == pytest.approx(0.1)


def test_open_store_kube_url(kube_api: KubeApiServer) -> None:
    store = open_store(f"kube:?kubeconfig={kube_api.kubeconfig}&qps=7&burst=9")
    assert isinstance(store, KubeStore)
    assert (store.limiter.qps, store.limiter.burst) == (7, 9)
    assert store.apply(topo("r1")).name == "r1"
    assert kube_api.get_object("topologies", "default", "r1") is not None
    store.close()


def test_default_limits_are_documented_ones(kube_api: KubeApiServer) -> None:
    store = KubeStore(kube_api.api_client())
    assert (store.limiter.qps, store.limiter.burst) == (50, 100)
    store.close()


def test_watch_relists_after_410_gone(kube_api: KubeApiServer, store: KubeStore,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_store, "WATCH_SECONDS", 1)  # reconnect soon, from the version it last saw
    collection = f"{BASE}/namespaces/a/topologies"
    store.apply(topo("r0", "a"))
    deadline = time.monotonic() + 8
    with contextlib.closing(store.watch("a", stop=lambda: time.monotonic() > deadline, timeout=0.05)) as events:
        # The watch lists and connects on a thread of its own: compacted before it connected, its
        # first watch (not a reconnect) would be the one refused (CI saw that once, on a busy machine).
        while not any(r.query.get("watch") == "true" for r in kube_api.requests if r.path == collection):
            time.sleep(0.01)
            assert time.monotonic() < deadline, "the watch never connected"
        store.apply(topo("r1", "b"))  # moves the server's version on; the watch of "a" does not see it
        kube_api.compact()  # ... so its reconnect gets 410 Gone
        watches_before = kube_api.count("GET", collection)
        while kube_api.count("GET", collection) < watches_before + 3:
            time.sleep(0.05)  # the reconnect (410), the re-list, the watch from the re-listed version
            assert time.monotonic() < deadline, "the watch never reconnected"
        store.apply(topo("r1", "a"))
        first = next(events)
    assert (first.type, first.topology.key) == ("ADDED", ("a", "r1"))
    asked = [r.query for r in kube_api.requests if (r.method, r.path) == ("GET", collection)]
    assert [q.get("watch") for q in asked] == [None, "true", "true", None, "true"]
    assert asked[2]["resourceVersion"] == asked[1]["resourceVersion"] != "0"


def test_watch_reader_thread_ends_with_the_watch(store: KubeStore) -> None:
    stop = threading.Event()
    events = store.watch(stop=stop.is_set, timeout=0.05)
    store.apply(topo("r1"))
    assert next(events).type == "ADDED"
    stop.set()
    assert list(events) == []
    assert not [t for t in threading.enumerate() if t.name == "meshnet-kube-watch"]


def test_link_states_are_one_guarded_patch_whoever_wrote_other_entries(kube_api: KubeApiServer,
                                                                       store: KubeStore) -> None:
    from meshnet.model import LinkStatus, Skip

    store.apply(Topology("r1", "default", tuple(Link(u, f"r{u + 1}", f"eth{u}", "eth1") for u in (1, 2))))
    known = store.update_status("default", "r1", lambda t: TopologyStatus(
        container_id="c1", links=tuple(LinkStatus(u, "", "pending", "", "") for u in (1, 2)),
        skipped=(Skip("r2", 1), Skip("r3", 2))))
    assert known is not None
    up = [LinkStatus(u, "veth", "up", "", f"eth{u}") for u in (1, 2)]
    kube_api.reset_counts()
    store.update_link_states("default", "r1", "c1", [up[1]], known=known)
    store.update_link_states("default", "r1", "c1", [up[0]], known=known)  # stale copy: entry 2 changed
    assert [(r.method, r.path.endswith("/status")) for r in kube_api.requests] == [("PATCH", True)] * 2
    # The entry itself changed since the copy: the guard fails (422), then get + put.
    kube_api.reset_counts()
    store.update_link_states("default", "r1", "c1", [LinkStatus(1, "veth", "error", "x", "eth1")], known=known)
    assert [r.method for r in kube_api.requests] == ["PATCH", "GET", "PUT"]
    final = store.get("default", "r1")
    assert final is not None and final.status.links == (LinkStatus(1, "veth", "error", "x", "eth1"), up[1])


def test_a_status_write_in_a_watch_keeps_the_parsed_spec_and_a_spec_change_is_parsed(
        kube_api: KubeApiServer, store: KubeStore) -> None:
    """Most watch events are status writes, and the spec's parse was over half of an event's cost
    to every daemon: the API server's metadata.generation says whether the spec changed."""
    store.apply(topo("r1"))
    stop = threading.Event()
    events = store.watch("default", stop=stop.is_set, timeout=0.05)
    try:
        store.update_status("default", "r1", bump)  # the watch has a copy to compare with
        added = next(events)
        first = next(events) if added.type == "ADDED" else added
        assert first.topology.generation == 1
        store.update_status("default", "r1", bump)
        again = next(events)
        assert again.topology.links is first.topology.links, "a status write re-parsed the spec"
        assert again.topology.status.container_id == "2"  # the status itself is always parsed
        store.apply(Topology("r1", "default", (Link(1, "r2", "eth1", "eth7"),)))  # a spec change
        changed = next(events)
        assert changed.topology.generation == 2 and changed.topology.links[0].peer_intf == "eth7"
    finally:
        stop.set()
        list(events)


def test_the_spec_is_reused_only_for_the_same_object_at_the_same_generation() -> None:
    raw = topo("r1").to_api()
    raw["metadata"].update(generation=3, resourceVersion="9")
    like = Topology.from_api(raw)
    raw["status"] = {"container_id": "c", "node": "n1"}
    raw["metadata"]["resourceVersion"] = "10"
    same = Topology.from_api(raw, like=like)
    assert same.links is like.links and same.status.node == "n1" and same.resource_version == "10"
    for key, value in (("generation", 4), ("generation", "3"), ("name", "r3"), ("namespace", "other")):
        other = {**raw, "metadata": {**raw["metadata"], key: value}}
        assert Topology.from_api(other, like=like).links is not like.links, (key, value)
    gone = {**raw, "metadata": {k: v for k, v in raw["metadata"].items() if k != "generation"}}
    assert Topology.from_api(gone, like=like).links is not like.links  # no generation: not known
    # What is wrong in the status is still refused.
    bad = {**raw, "status": {"src_ip": "not-an-address"}}
    assert Topology.from_api(bad, like=like).status.problems


def test_a_request_does_not_look_the_proxy_up_in_the_environment_again(
        kube_api: KubeApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubeconfig and in-cluster loaders assign `host` again before every request (their token
    refresh hook), and the client re-read the proxy from the environment each time (a walk of
    os.environ: a quarter of a status write's client CPU). The proxy chosen at load is kept."""
    from kubernetes.client import configuration

    monkeypatch.setenv("no_proxy", "127.0.0.1")
    store = KubeStore(kubeconfig=kube_api.kubeconfig, qps=10_000, burst=10_000)
    looked = [0]
    real = configuration.getproxies

    def counted() -> dict[str, str]:
        looked[0] += 1
        return real()

    monkeypatch.setattr(configuration, "getproxies", counted)
    try:
        store.apply(topo("r1"))
        for _ in range(5):
            store.update_status("default", "r1", bump)
        assert store.get("default", "r1") is not None
        assert looked[0] == 0
    finally:
        store.close()
