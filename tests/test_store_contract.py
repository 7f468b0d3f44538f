"""The store contract: one suite, run against every store (SQLite file, Kubernetes API test server)."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from meshnet.model import Link, LinkStatus, ManifestError, Skip, Topology, TopologyStatus
from meshnet.store import Store, WatchEvent
from meshnet.store.resync import resync_events
from tests.kubeapi import KubeApiServer, fixtures

# Until the project's conftest imports it, the fixture is taken from its module here.
kube_api = fixtures.kube_api


def topo(name: str, namespace: str = "default", *, peer: str = "r2", uid: int = 1) -> Topology:
    return Topology(name, namespace, (Link(uid, peer, "eth1", "eth1"),))


@pytest.fixture(params=["sqlite", "kube"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store
    if request.param == "sqlite":
        from meshnet.store.sqlite import SqliteStore

        opened = SqliteStore(tmp_path / "store.db")
    else:
        from meshnet.store.kube import KubeStore

        server: KubeApiServer = request.getfixturevalue("kube_api")
        # The contract is about semantics; the rate limiter has its own test (test_store_kube.py).
        opened = KubeStore(server.api_client(), qps=10_000, burst=10_000)
    try:
        yield opened
    finally:
        opened.close()


def collect(events: Iterator[WatchEvent], count: int, done: threading.Event) -> list[WatchEvent]:
    got: list[WatchEvent] = []
    for event in events:
        got.append(event)
        if len(got) == count:
            done.set()
    return got


def watch_until(store: Store, count: int, action: Callable[[], None], namespace: str | None = None,
                limit: float = 5.0) -> list[WatchEvent]:
    """Start a watch, run `action`, return the first `count` events (fewer if `limit` passes)."""
    done = threading.Event()
    deadline = time.monotonic() + limit
    events = store.watch(namespace, stop=lambda: done.is_set() or time.monotonic() > deadline, timeout=0.05)
    action()
    return collect(events, count, done)


def test_get_missing_is_none(store: Store) -> None:
    assert store.get("default", "nope") is None


def test_apply_then_get(store: Store) -> None:
    rich = Topology("r1", "default", (
        Link(1, "r2", "eth1", "eth1", ipaddress.ip_interface("12.12.12.1/24"),
             ipaddress.ip_interface("12.12.12.2/24"), 9000),
        Link(2, "localhost", "eth2", "eth0"),
    ))
    stored = store.apply(rich)
    assert stored.links == rich.links
    assert stored.resource_version
    assert stored.status == TopologyStatus()
    assert store.get("default", "r1") == stored


def test_apply_does_not_write_status(store: Store) -> None:
    """Status belongs to the daemons (the CR's status subresource): a create starts without one."""
    stored = store.apply(topo("r1").with_status(TopologyStatus(src_ip="10.0.0.1", net_ns="/run/netns/x")))
    assert stored.status == TopologyStatus()
    got = store.get("default", "r1")
    assert got is not None and got.status == TopologyStatus()


def test_list_by_namespace_and_all_sorted(store: Store) -> None:
    for ns, name in [("b", "r3"), ("b", "r1"), ("a", "r2"), ("b", "r2"), ("a", "r1")]:
        store.apply(topo(name, ns, peer="x"))
    assert [t.key for t in store.list("b")] == [("b", "r1"), ("b", "r2"), ("b", "r3")]
    assert [t.key for t in store.list()] == [("a", "r1"), ("a", "r2"), ("b", "r1"), ("b", "r2"), ("b", "r3")]
    assert store.list("empty") == []
    assert store.list("a")[0] == store.get("a", "r1")


def test_apply_replaces_spec_and_keeps_status(store: Store) -> None:
    first = store.apply(topo("r1"))
    status = TopologyStatus(src_ip="198.51.100.1", net_ns="/var/run/netns/x", container_id="c1", node="n1",
                            skipped=(Skip("r2", 1),), links=(LinkStatus(1, "veth", "up"),),
                            plumbing_error="boom")
    with_status = store.update_status("default", "r1", lambda t: status)
    assert with_status is not None and with_status.status == status
    new_links = (Link(1, "r2", "eth1", "eth1"), Link(7, "r3", "eth2", "eth5"))
    second = store.apply(Topology("r1", "default", new_links, TopologyStatus(src_ip="ignored")))
    assert second.links == new_links
    assert second.status == status
    assert second.resource_version not in ("", first.resource_version, with_status.resource_version)
    assert store.get("default", "r1") == second


def test_apply_same_spec_changes_nothing(store: Store) -> None:
    first = store.apply(topo("r1"))
    assert store.apply(topo("r1")).resource_version == first.resource_version


def test_delete(store: Store) -> None:
    store.apply(topo("r1"))
    store.apply(topo("r2", peer="r1"))
    assert store.delete("default", "r1") is True
    assert store.get("default", "r1") is None
    assert store.delete("default", "r1") is False
    assert [t.name for t in store.list("default")] == ["r2"]


def test_update_status_never_loses_an_update(store: Store) -> None:
    store.apply(topo("r1"))

    def increment(current: Topology) -> TopologyStatus:
        return replace(current.status, container_id=str(int(current.status.container_id or "0") + 1))

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(25):
                store.update_status("default", "r1", increment)
        except BaseException as e:  # reported below; a thread's exception would vanish otherwise
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    final = store.get("default", "r1")
    assert final is not None and final.status.container_id == "200"


def test_update_status_returning_none_writes_nothing(store: Store) -> None:
    stored = store.apply(topo("r1"))
    seen: list[Topology] = []

    def look(current: Topology) -> None:
        seen.append(current)

    assert store.update_status("default", "r1", look) == stored
    assert seen == [stored]
    assert store.get("default", "r1") == stored  # same resourceVersion: nothing was written


def _bump(current: Topology) -> TopologyStatus:
    return replace(current.status, container_id=str(int(current.status.container_id or "0") + 1))


def test_update_status_from_a_fresh_known_copy(store: Store) -> None:
    stored = store.apply(topo("r1"))
    out = store.update_status("default", "r1", _bump, known=stored)
    assert out is not None and out.status.container_id == "1"
    assert store.get("default", "r1") == out


def test_a_stale_known_copy_never_loses_an_update(store: Store) -> None:
    stale = store.apply(topo("r1"))
    store.update_status("default", "r1", _bump)  # someone else wrote since `stale` was read
    seen: list[str] = []

    def bump_seen(current: Topology) -> TopologyStatus:
        seen.append(current.status.container_id)
        return _bump(current)

    out = store.update_status("default", "r1", bump_seen, known=stale)
    assert out is not None and out.status.container_id == "2"  # computed again from the fresh read
    assert seen == ["", "1"]
    assert store.get("default", "r1") == out


def test_a_stale_known_copy_is_never_the_reason_nothing_is_written(store: Store) -> None:
    """A DEL decides from the status whether the pod is still its own: that verdict must come from
    the store, not from a copy read before a newer ADD wrote its container id."""
    stale = store.apply(topo("r1"))
    store.update_status("default", "r1", lambda cur: replace(cur.status, container_id="new"))
    verdicts: list[str] = []

    def clear_if_unowned(current: Topology) -> TopologyStatus | None:
        verdicts.append(current.status.container_id)
        return None if current.status.container_id == "" else TopologyStatus()

    out = store.update_status("default", "r1", clear_if_unowned, known=stale)
    assert verdicts == ["", "new"]  # the stale copy's "nothing to do" was checked against the store
    assert out is not None and out.status == TopologyStatus()


def test_a_known_copy_of_another_object_or_without_version_is_ignored(store: Store) -> None:
    r1 = store.apply(topo("r1"))
    store.apply(topo("r2", peer="r1"))
    seen: list[str] = []

    def record(current: Topology) -> TopologyStatus:
        seen.append(current.name)
        return _bump(current)

    store.update_status("default", "r2", record, known=r1)
    store.update_status("default", "r1", record, known=replace(r1, resource_version=""))
    assert seen == ["r2", "r1"]


def test_a_known_copy_of_a_deleted_topology_writes_nothing(store: Store) -> None:
    stale = store.apply(topo("r1"))
    store.delete("default", "r1")
    assert store.update_status("default", "r1", _bump, known=stale) is None
    assert store.get("default", "r1") is None


def test_update_status_of_missing_topology(store: Store) -> None:
    def must_not_run(current: Topology) -> TopologyStatus:
        raise AssertionError("fn called for a missing Topology")

    assert store.update_status("default", "nope", must_not_run) is None


def test_watch_reports_changes_after_it_started(store: Store) -> None:
    store.apply(topo("before"))
    store.apply(topo("r9", "other"))

    def changes() -> None:
        store.apply(topo("r1"))
        store.apply(topo("r9", "other", peer="r8"))
        store.update_status("default", "r1", lambda t: TopologyStatus(src_ip="198.51.100.2", net_ns="/run/netns/n"))
        store.delete("default", "r1")

    events = watch_until(store, 3, changes, namespace="default")
    assert [(e.type, e.topology.name) for e in events] == [("ADDED", "r1"), ("MODIFIED", "r1"), ("DELETED", "r1")]
    assert events[1].topology.status.src_ip == "198.51.100.2"
    assert events[1].topology.links == topo("r1").links
    versions = [int(e.topology.resource_version) for e in events]
    assert versions == sorted(versions)


def test_watch_all_namespaces(store: Store) -> None:
    def changes() -> None:
        store.apply(topo("r1", "a"))
        store.apply(topo("r1", "b"))

    events = watch_until(store, 2, changes)
    assert [(e.type, e.topology.key) for e in events] == [("ADDED", ("a", "r1")), ("ADDED", ("b", "r1"))]


def test_watch_ends_when_stopped(store: Store) -> None:
    stop_at = time.monotonic() + 0.3
    started = time.monotonic()
    assert list(store.watch(stop=lambda: time.monotonic() > stop_at, timeout=0.05)) == []
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(("bad", "field"), [
    (Topology("r1", "default", (Link(1, "r2", "eth0", "eth1"),)), "local_intf"),
    (Topology("R_1", "default", (Link(1, "r2", "eth1", "eth1"),)), "metadata.name"),
    (Topology("r1", "default", (Link(1, "r2", "eth1", "eth1"), Link(1, "r3", "eth2", "eth1"))), "uid"),
])
def test_apply_refuses_a_bad_topology(store: Store, bad: Topology, field: str) -> None:
    with pytest.raises(ManifestError, match=field):
        store.apply(bad)
    assert store.list() == []


def test_resync_events_turn_known_into_current() -> None:
    kept, changed, gone, new = topo("a"), topo("b"), topo("c"), topo("d")
    known = {t.key: replace(t, resource_version="1") for t in (kept, changed, gone)}
    current = [replace(kept, resource_version="1"), replace(changed, resource_version="5"),
               replace(new, resource_version="6")]
    events = resync_events(known, current)
    assert [(e.type, e.topology.name) for e in events] == [("DELETED", "c"), ("MODIFIED", "b"), ("ADDED", "d")]
    assert known == {t.key: t for t in current}


def test_every_status_field_survives_the_store(store: Store) -> None:
    """The kube store passes through the CRD's status schema (the API server prunes what it does
    not declare): every field meshnet writes must come back."""
    store.apply(topo("r1"))
    status = TopologyStatus(src_ip="198.51.100.1", net_ns="/var/run/netns/x", container_id="c1", node="n1",
                            skipped=(Skip("r2", 1),), links=(LinkStatus(1, "vxlan", "error", "why", "eth1"),),
                            plumbing_error="uid 1: why", vni_block=4000)
    store.update_status("default", "r1", lambda cur: status)
    got = store.get("default", "r1")
    assert got is not None and got.status == status


def _three_links_waiting(store: Store, container: str = "c1") -> Topology:
    """r1 with links 1-3 to r2, r3, r4, all pending (and skipped), owned by sandbox `container`."""
    store.apply(Topology("r1", "default", tuple(Link(u, f"r{u + 1}", f"eth{u}", "eth1") for u in (1, 2, 3))))
    written = store.update_status("default", "r1", lambda t: TopologyStatus(
        container_id=container,
        links=tuple(LinkStatus(u, "", "pending", "waiting", "") for u in (1, 2, 3)),
        skipped=tuple(Skip(f"r{u + 1}", u) for u in (1, 2, 3))))
    assert written is not None
    return written


def _up(uid: int) -> LinkStatus:
    return LinkStatus(uid, "veth", "up", "", f"eth{uid}")


def test_link_states_change_only_their_entries_over_a_stale_copy(store: Store) -> None:
    known = _three_links_waiting(store)
    # Another writer changes link 3 after our copy was read.
    store.update_link_states("default", "r1", "c1", [_up(3)], known=known)
    got = store.update_link_states("default", "r1", "c1", [_up(1)], known=known)
    assert got is not None and got == store.get("default", "r1")
    assert got.status.links == (_up(1), known.status.links[1], _up(3))
    assert got.status.skipped == (Skip("r3", 2),)
    assert got.status.container_id == "c1"


def test_link_states_over_a_stale_copy_of_the_same_entry_still_land(store: Store) -> None:
    known = _three_links_waiting(store)
    error = LinkStatus(1, "veth", "error", "boom", "eth1")
    store.update_link_states("default", "r1", "c1", [error], known=known)  # entry 1 changed meanwhile
    got = store.update_link_states("default", "r1", "c1", [_up(1)], known=known)
    assert got is not None and got.status.links[0] == _up(1)
    assert [s.link_id for s in got.status.skipped] == [2, 3]


def test_link_states_add_entries_and_waiting_links(store: Store) -> None:
    known = _three_links_waiting(store)
    store.update_status("default", "r1", lambda t: replace(t.status, links=t.status.links[:2], skipped=()))
    got = store.update_link_states("default", "r1", "c1", [LinkStatus(3, "", "pending", "again", "")], known=known)
    assert got is not None
    assert [s.uid for s in got.status.links] == [1, 2, 3]
    assert got.status.skipped == (Skip("r4", 3),)


def test_link_states_leave_a_newer_sandboxs_status_alone(store: Store) -> None:
    known = _three_links_waiting(store)
    newer = store.update_status("default", "r1", lambda t: replace(t.status, container_id="c2"))
    assert newer is not None
    assert store.update_link_states("default", "r1", "c1", [_up(1)], known=known) == newer
    assert store.get("default", "r1") == newer
    assert store.update_link_states("default", "r1", "c1", [_up(1)], known=newer) == newer


def test_link_states_of_a_missing_topology(store: Store) -> None:
    known = _three_links_waiting(store)
    store.delete("default", "r1")
    assert store.update_link_states("default", "r1", "c1", [_up(1)], known=known) is None


def test_link_state_writers_racing_on_one_status_lose_nothing(store: Store) -> None:
    uids = range(1, 25)
    store.apply(Topology("r1", "default", tuple(Link(u, f"p{u}", f"eth{u}", "eth1") for u in uids)))
    known = store.update_status("default", "r1", lambda t: TopologyStatus(
        container_id="c1", links=tuple(LinkStatus(u, "", "pending", "", "") for u in uids),
        skipped=tuple(Skip(f"p{u}", u) for u in uids)))
    assert known is not None
    start = threading.Barrier(len(uids))
    failures: list[BaseException] = []

    def one(uid: int) -> None:
        try:
            start.wait()
            store.update_link_states("default", "r1", "c1", [_up(uid)], known=known)
        except BaseException as e:  # reported below; a thread's exception would vanish otherwise
            failures.append(e)

    threads = [threading.Thread(target=one, args=(u,)) for u in uids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    final = store.get("default", "r1")
    assert final is not None
    assert final.status.links == tuple(_up(u) for u in uids)
    assert final.status.skipped == ()
