"""Large peer batches (issue 14 item 4) without root: a hub pod's far ends go in pages, a page the
peer refuses fails only its links, a peer that did not answer is not waited on again within its
back-off (per peer, with jitter, capped), and the receiver reads each pod of a batch once.

The store is a real sqlite store and the daemon core is real; the gRPC edge is a fake peer client
(the allowed fake at that boundary), runtime namespaces exist on paper (tests/test_daemon_core.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pytest_subprocess import FakeProcess

from meshnet import naming
from meshnet.daemon.config import DEFAULT_GRPC_PORT as GRPC_PORT
from meshnet.daemon.node import NodeDaemon
from meshnet.daemon.peer_auth import Caller
from meshnet.daemon.peer_client import (
    PEER_BATCH_MAX,
    PEER_PAGE,
    PEER_PAGE_LINKS,
    PEER_RETRY_FIRST,
    PEER_RETRY_JITTER,
    PEER_RETRY_MAX,
    PeerBackoff,
    PeerError,
    PeerLink,
    paginate,
)
from meshnet.daemon.peer_service import PeerDenied
from meshnet.executor import Executor
from meshnet.model import Topology, parse_manifest
from meshnet.store.sqlite import SqliteStore
from tests.test_daemon_core import NODE0, NS, VTEP1, PaperNetns, cni, set_alive
from tests.test_daemon_core import kernel as kernel  # pytest fixtures, used by name
from tests.test_daemon_core import paper as paper

PEER = f"{VTEP1}:{GRPC_PORT}"
SPOKES = 2 * PEER_PAGE + 22  # three pages


def hub_manifest(spokes: int) -> str:
    """Pod `hub` with a link to each of `spokes` pods s0..s<n-1>."""
    docs = ["apiVersion: networkop.co.uk/v1beta1\nkind: Topology\nmetadata: {name: hub}\nspec:\n  links:\n"
            + "".join(f"  - {{uid: {i + 1}, peer_pod: s{i}, local_intf: e{i}, peer_intf: eth1}}\n"
                      for i in range(spokes))]
    docs += [f"apiVersion: networkop.co.uk/v1beta1\nkind: Topology\nmetadata: {{name: s{i}}}\nspec:\n  links:\n"
             f"  - {{uid: {i + 1}, peer_pod: hub, local_intf: eth1, peer_intf: e{i}}}\n" for i in range(spokes)]
    return "---\n".join(docs)


@dataclass
class ScriptedPeers:
    """The gRPC edge: records every call (method, address, uids); `answer` decides each call's fate
    (None: success, else the PeerError to raise); `delay` stands for the time a dead peer costs."""

    calls: list[tuple[str, str, list[int]]] = field(default_factory=list)
    answer: dict[str, PeerError | None] = field(default_factory=dict)
    refuse_uid: int = 0
    delay: float = 0.0
    busy: int = 0
    in_flight: list[int] = field(default_factory=list)  # calls running as each one started
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _call(self, method: str, address: str, links: Sequence[PeerLink]) -> list[str]:
        with self.lock:
            self.calls.append((method, address, [lk.uid for lk in links]))
            self.busy += 1
            self.in_flight.append(self.busy)
        time.sleep(self.delay)
        with self.lock:
            self.busy -= 1
        err = self.answer.get(address)
        if err is not None:
            raise err
        if self.refuse_uid in [lk.uid for lk in links]:
            raise PeerError(f"{address}: PERMISSION_DENIED: link uid {self.refuse_uid} refused")
        return ["created" if method == "update" else "removed"] * len(links)

    def update_many(self, address: str, links: Sequence[PeerLink]) -> list[str]:
        return self._call("update", address, links)

    def remove_many(self, address: str, links: Sequence[PeerLink]) -> list[str]:
        return self._call("remove", address, links)


@pytest.fixture
def hub_store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "store.db")
    for t in parse_manifest(hub_manifest(SPOKES)).topologies:
        s.apply(t)
    yield s
    s.close()


@dataclass
class Hub:
    core: NodeDaemon
    peers: ScriptedPeers
    store: SqliteStore
    paper: PaperNetns


@pytest.fixture
def hub(hub_store: SqliteStore, paper: PaperNetns, kernel: FakeProcess) -> Iterator[Hub]:
    """node0 runs `hub`; every spoke is alive on node1 (VTEP1)."""
    peers = ScriptedPeers()
    core = NodeDaemon(NODE0, hub_store, Executor(dry_run=True), peers, grpc_port=GRPC_PORT)
    for i in range(SPOKES):
        set_alive(hub_store, f"s{i}", "node1", VTEP1, paper.make(f"ps{i}"))
    yield Hub(core, peers, hub_store, paper)
    core.close()


def states(store: SqliteStore, pod: str) -> dict[int, str]:
    t = store.get(NS, pod)
    assert t is not None
    return {s.uid: s.state for s in t.status.links}


def test_a_hub_s_far_ends_go_in_pages_of_bounded_size_one_after_the_other(hub: Hub) -> None:
    hub.peers.delay = 0.1
    cni(hub.core, "ADD", "hub", hub.paper.make("ph"), "cid-h")
    sizes = [len(uids) for _, _, uids in hub.peers.calls]
    assert sizes == [PEER_PAGE, PEER_PAGE, SPOKES - 2 * PEER_PAGE]
    assert max(hub.peers.in_flight) == 1  # pages to one node share no deadline
    assert sorted(u for _, _, uids in hub.peers.calls for u in uids) == list(range(1, SPOKES + 1))
    assert set(states(hub.store, "hub").values()) == {"up"}


def test_pages_are_bounded_by_receiving_pods_and_by_links() -> None:
    def links(pods: int, per_pod: int) -> list[PeerLink]:
        return [PeerLink(NS, f"s{p}", "hub", p * per_pod + i + 1, 0, "eth1", f"e{i}", "", "", VTEP1)
                for p in range(pods) for i in range(per_pod)]

    # A hub's far ends, one pod each: PEER_PAGE pods a page.
    many = links(2 * PEER_PAGE + 1, 1)
    assert [len(p) for p in paginate(many)] == [PEER_PAGE, PEER_PAGE, 1]
    # One pod's many far ends: PEER_PAGE_LINKS a page, not PEER_PAGE (47 calls for 1500 links).
    one = links(1, 2 * PEER_PAGE_LINKS + 3)
    assert [len(p) for p in paginate(one)] == [PEER_PAGE_LINKS, PEER_PAGE_LINKS, 3]
    # Both bounds at once, the order of the links kept, nothing lost.
    mixed = links(PEER_PAGE + 5, 20)
    pages = paginate(mixed)
    assert all(len(p) <= PEER_PAGE_LINKS and len({lk.pod for lk in p}) <= PEER_PAGE for p in pages)
    assert [lk for p in pages for lk in p] == mixed
    assert paginate([]) == []


def test_a_refused_page_fails_only_its_own_links(hub: Hub) -> None:
    hub.peers.refuse_uid = PEER_PAGE + 5  # in the second page
    result = cni(hub.core, "ADD", "hub", hub.paper.make("ph"), "cid-h")
    assert result is not None  # the ADD succeeds: the local ends are built
    st = states(hub.store, "hub")
    refused = [u for u, s in st.items() if s == "error"]
    second = next(uids for _, _, uids in hub.peers.calls if PEER_PAGE + 5 in uids)
    assert sorted(refused) == sorted(second) and len(refused) == PEER_PAGE
    assert sum(s == "up" for s in st.values()) == SPOKES - PEER_PAGE
    # An answer (a refusal) is no sign of a dead peer: the next ADD calls it again.
    assert hub.core.peer_client.backoff.fail_fast(PEER) == ""


def test_an_add_towards_a_dead_peer_waits_for_it_once_per_back_off(hub: Hub) -> None:
    hub.peers.delay = 0.5  # what the deadline costs each call
    hub.peers.answer[PEER] = PeerError(f"{PEER}: DEADLINE_EXCEEDED: Deadline Exceeded", unreachable=True)
    t0 = time.monotonic()
    cni(hub.core, "ADD", "hub", hub.paper.make("ph"), "cid-h")
    first = time.monotonic() - t0
    calls = len(hub.peers.calls)
    assert calls == 1 and first >= 0.5  # the first page waited; the next ones knew better
    assert set(states(hub.store, "hub").values()) == {"error"}

    t0 = time.monotonic()
    result = cni(hub.core, "ADD", "hub", hub.paper.make("ph"), "cid-h2")  # the pod restarted
    second = time.monotonic() - t0
    assert result is not None and [i["name"] for i in result["interfaces"]][:2] == ["eth0", "e0"]
    assert len(hub.peers.calls) == calls, "the dead peer was called again within its back-off"
    assert second < 0.4, second
    t = hub.store.get(NS, "hub")
    assert t is not None and "unreachable, not asked again for" in t.status.plumbing_error
    assert "DEADLINE_EXCEEDED" in t.status.plumbing_error  # why it is thought dead
    assert set(states(hub.store, "hub").values()) == {"error"}

    # Owed for the reconciler: nothing before the back-off ends; news of the peer (a status its
    # daemon wrote) makes it due at once, and then it is asked again.
    assert hub.core.take_retries() == set()
    hub.core.reconcile()
    assert len(hub.peers.calls) == calls
    hub.peers.answer.clear()
    hub.peers.delay = 0.0
    assert hub.core.peer_client.backoff.back(PEER)
    assert hub.core.take_retries() == {(NS, "hub")}
    hub.core.reconcile(hub.core.take_retries())
    assert len(hub.peers.calls) == calls + 3  # every page
    assert set(states(hub.store, "hub").values()) == {"up"}
    assert hub.core.take_retries() == set()


def test_a_dead_peer_is_not_waited_on_by_a_del_within_its_back_off(hub: Hub) -> None:
    cni(hub.core, "ADD", "hub", hub.paper.make("ph"), "cid-h")
    hub.peers.answer[PEER] = PeerError(f"{PEER}: UNAVAILABLE: connection refused", unreachable=True)
    hub.core.peer_client.backoff.failed(PEER, unreachable=True, error="UNAVAILABLE")
    calls = len(hub.peers.calls)
    cni(hub.core, "DEL", "hub", "/var/run/netns/ph", "cid-h")
    assert len(hub.peers.calls) == calls


def test_a_del_that_finds_the_peer_dead_spares_the_next_add_the_wait(hub: Hub) -> None:
    cni(hub.core, "ADD", "hub", hub.paper.make("ph"), "cid-h")
    calls = len(hub.peers.calls)
    hub.peers.answer[PEER] = PeerError(f"{PEER}: UNAVAILABLE: connection refused", unreachable=True)
    cni(hub.core, "DEL", "hub", "/var/run/netns/ph", "cid-h")
    assert len(hub.peers.calls) == calls + 1  # its first page found the peer dead; the others knew
    cni(hub.core, "ADD", "hub", hub.paper.make("ph"), "cid-h2")
    assert len(hub.peers.calls) == calls + 1
    t = hub.store.get(NS, "hub")
    assert t is not None and "(last: " + PEER + ": UNAVAILABLE" in t.status.plumbing_error


def test_backoff_is_per_peer_jittered_and_capped() -> None:
    now = [0.0]
    rolls = iter([1.0, 0.0, 0.5, 1.0, 0.0, 0.999, 0.25] * 3)
    b = PeerBackoff(clock=lambda: now[0], rand=lambda: next(rolls))
    waits = []
    for _ in range(7):
        b.failed("p:1", unreachable=True)
        start = now[0]
        while not b.due("p:1"):
            now[0] += 0.125
        waits.append(now[0] - start)
    bases = [min(PEER_RETRY_FIRST * 2 ** k, PEER_RETRY_MAX) for k in range(7)]
    assert waits[0] == pytest.approx(bases[0] * (1 - PEER_RETRY_JITTER), abs=0.125)  # roll 1.0: shortest
    assert waits[1] == pytest.approx(bases[1], abs=0.125)  # roll 0.0: the full wait
    for w, base in zip(waits, bases, strict=True):
        assert base * (1 - PEER_RETRY_JITTER) - 0.125 <= w <= base + 0.125
    assert max(waits) <= PEER_RETRY_MAX + 0.125
    # Per peer: another address is not held back by p:1.
    b.failed("p:1", unreachable=True)
    assert not b.due("p:1") and b.due("q:1") and b.fail_fast("q:1") == ""


def test_failures_in_one_back_off_window_count_once() -> None:
    """Many ADDs meeting the same dead peer at once must not push its next try to a minute."""
    now = [0.0]
    b = PeerBackoff(clock=lambda: now[0], rand=lambda: 0.0)
    for _ in range(10):
        b.failed("p:1", unreachable=True)
    now[0] = PEER_RETRY_FIRST
    assert b.due("p:1")
    b.failed("p:1", unreachable=True)
    now[0] += 2 * PEER_RETRY_FIRST - 0.01
    assert not b.due("p:1")
    now[0] += 0.02
    assert b.due("p:1")


def test_only_a_peer_that_did_not_answer_fails_fast() -> None:
    now = [0.0]
    b = PeerBackoff(clock=lambda: now[0], rand=lambda: 0.0)
    b.failed("p:1", error="PERMISSION_DENIED")  # it answered: the next ADD may ask it
    assert not b.due("p:1") and b.fail_fast("p:1") == ""
    b.failed("q:1", unreachable=True, error="q:1: UNAVAILABLE: connection refused")
    assert "q:1 unreachable, not asked again for 5.0 s (last: q:1: UNAVAILABLE" in b.fail_fast("q:1")
    b.back("q:1")  # its daemon wrote a status: worth a try at once
    assert b.fail_fast("q:1") == ""
    b.failed("r:1", unreachable=True)
    now[0] = PEER_RETRY_FIRST  # the back-off is over: one call may try again
    assert b.fail_fast("r:1") == ""
    b.succeeded("q:1")
    assert b.due("q:1") and b.fail_fast("q:1") == ""


def test_when_the_wait_is_over_one_call_tries_the_dead_peer_and_the_others_still_fail_fast() -> None:
    now = [0.0]
    b = PeerBackoff(clock=lambda: now[0], rand=lambda: 0.0)
    b.failed("p:1", unreachable=True, error="DEADLINE_EXCEEDED")
    now[0] = PEER_RETRY_FIRST
    assert b.fail_fast("p:1") == ""  # this caller tries it
    assert "another call is trying it now (last: DEADLINE_EXCEEDED)" in b.fail_fast("p:1")
    b.failed("p:1", unreachable=True, error="DEADLINE_EXCEEDED")  # the try timed out: a longer wait
    assert "not asked again for 10.0 s" in b.fail_fast("p:1")
    now[0] += 2 * PEER_RETRY_FIRST
    assert b.fail_fast("p:1") == ""
    b.succeeded("p:1")  # it answered: everyone may call it
    assert b.fail_fast("p:1") == "" and b.fail_fast("p:1") == ""
    # An answer that refused a page: calls go on (the next page is the prober's own), the wait for
    # what failed stays for the reconciler.
    b.failed("q:1", unreachable=True)
    now[0] += PEER_RETRY_FIRST
    assert b.fail_fast("q:1") == "" and b.fail_fast("q:1") != ""
    b.answered("q:1")
    assert b.fail_fast("q:1") == "" and b.fail_fast("q:1") == ""


# --- the receiving side -------------------------------------------------------------------------


@pytest.fixture
def receiver(hub_store: SqliteStore, paper: PaperNetns, kernel: FakeProcess) -> Iterator[Hub]:
    """node0 runs every spoke; the hub is alive on node1 (VTEP1) and calls."""
    peers = ScriptedPeers()
    core = NodeDaemon(NODE0, hub_store, Executor(dry_run=True), peers, grpc_port=GRPC_PORT)
    set_alive(hub_store, "hub", "node1", VTEP1, paper.make("ph"))
    for i in range(SPOKES):
        set_alive(hub_store, f"s{i}", "node0", NODE0.vtep_ip, paper.make(f"ps{i}"), here=core)
    yield Hub(core, peers, hub_store, paper)
    core.close()


def hub_requests(n: int) -> list[PeerLink]:
    return [PeerLink(NS, f"s{i}", "hub", i + 1, naming.vni(NS, i + 1), "eth1", f"e{i}", "", "", VTEP1)
            for i in range(n)]


def test_the_receiver_reads_each_pod_of_a_page_once(receiver: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    service = receiver.core.peer_service
    reads: list[tuple[str, str]] = []
    get = receiver.store.get

    def counted(namespace: str, pod: str, fresh: Callable[[Topology], bool] | None = None) -> Topology | None:
        reads.append((namespace, pod))
        return get(namespace, pod)

    monkeypatch.setattr(service, "read_topology", counted)
    # Nothing else reads the store for a peer request: the watch cache can replace this one function.
    monkeypatch.setattr(receiver.store, "get", lambda *a: pytest.fail(f"a read around read_topology: {a}"))
    actions = receiver.core.peer_update(hub_requests(PEER_PAGE), Caller(node="node1"))
    assert actions == ["created"] * PEER_PAGE
    assert sorted(reads) == sorted({(NS, "hub"), *((NS, f"s{i}") for i in range(PEER_PAGE))})


def test_the_receiver_refuses_an_unbounded_batch_before_reading_anything(receiver: Hub) -> None:
    service = receiver.core.peer_service
    reqs = hub_requests(SPOKES) * (PEER_BATCH_MAX // SPOKES + 1)
    assert len(reqs) > PEER_BATCH_MAX
    with pytest.raises(PeerDenied, match=f"{len(reqs)} links in one call: at most {PEER_BATCH_MAX}"):
        service.update(reqs, Caller(node="node1"))
    with pytest.raises(PeerDenied, match="at most"):
        service.remove(reqs, Caller(node="node1"))
