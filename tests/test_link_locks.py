"""Per-link locks (`NodeState.link_locks`): one holder per link at a time, and a lock exists only
while someone holds or waits for it. The table used to keep a lock for every (namespace, uid) the
node ever served, for the daemon's life: a CI cluster making a namespace per run grew it forever.

Real threads racing on overlapping links; no root needed (a dry-run executor, a SQLite store)."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from meshnet.daemon.state import NodeState
from meshnet.executor import Executor
from meshnet.plan import NodeInfo
from meshnet.store.sqlite import SqliteStore


def _state(tmp_path: Path) -> tuple[SqliteStore, NodeState]:
    store = SqliteStore(tmp_path / "s.db")
    return store, NodeState(NodeInfo("n0", "198.51.100.1", "lo"), store, Executor(dry_run=True), grpc_port=1)


def test_racing_holders_never_share_a_link_and_leave_no_lock_behind(tmp_path: Path) -> None:
    store, state = _state(tmp_path)
    inside: dict[tuple[str, int], int] = {}
    guard = threading.Lock()
    overlaps: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(300):
                ns = rng.choice(["ns-a", "ns-b"])
                uids = rng.sample(range(1, 9), rng.randint(1, 4))  # few links: they collide a lot
                with state.link_locks(ns, uids):
                    with guard:
                        for u in uids:
                            inside[(ns, u)] = inside.get((ns, u), 0) + 1
                            if inside[(ns, u)] > 1:
                                overlaps.append((ns, u))
                    time.sleep(0)  # let the others run while these links are held
                    with guard:
                        for u in uids:
                            inside[(ns, u)] -= 1
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and not any(t.is_alive() for t in threads)
        assert overlaps == []
        assert state.link_locks_in_use() == 0
    finally:
        store.close()


def test_a_lock_handed_from_one_holder_to_a_waiter_still_excludes_a_third(tmp_path: Path) -> None:
    """The first holder's release must not drop the lock the waiter now holds: a third caller
    waits for the waiter, not for a new lock of its own."""
    store, state = _state(tmp_path)
    first = state.link_locks("ns", [7])
    second_in, second_out = threading.Event(), threading.Event()

    def second() -> None:
        with state.link_locks("ns", [7]):
            second_in.set()
            second_out.wait(10)

    waiter = threading.Thread(target=second)
    waiter.start()
    try:
        deadline = time.monotonic() + 5
        while state._link_locks[("ns", 7)].users < 2:  # the waiter is queued on the same lock
            assert time.monotonic() < deadline
            time.sleep(0.001)
        first.close()
        assert second_in.wait(5)
        third_in = threading.Event()

        def third() -> None:
            with state.link_locks("ns", [7, 8]):
                third_in.set()

        late = threading.Thread(target=third)
        late.start()
        assert not third_in.wait(0.2), "a third caller got link 7 while the waiter held it"
        second_out.set()
        assert third_in.wait(5)
        late.join(5)
        waiter.join(5)
        assert state.link_locks_in_use() == 0
    finally:
        second_out.set()
        store.close()
