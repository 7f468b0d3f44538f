"""The store protocol: where Topologies (spec) and pod runtime state (status) live.

Two implementations pass one contract test-suite (`tests/test_store_contract.py`): `kube` (the
Topology CRs through the Kubernetes API) and `sqlite` (a local file, the lab's embedded default).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from meshnet.model import LinkStatus, Skip, Topology, TopologyStatus


class StoreError(Exception):
    """Any store failure; the CNI layer maps it to error 102 (store unavailable) unless more precise."""


class StoreConflict(StoreError):
    """A compare-and-set lost (stale resourceVersion) — and retrying did not help."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (API server down, database locked for too long)."""


class StoreInvalid(StoreError):
    """The backend refused the object (e.g. the CRD schema rejected it)."""


# fn(current) -> new status, or None for "leave it as it is"
StatusMutation = Callable[[Topology], TopologyStatus | None]


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    topology: Topology


class Store(Protocol):
    def get(self, namespace: str, name: str) -> Topology | None:
        """The Topology, or None when there is none (not found is not an error)."""
        ...

    def list(self, namespace: str | None = None) -> list[Topology]:
        """All Topologies of a namespace (None: of every namespace), sorted by (namespace, name)."""
        ...

    def apply(self, topology: Topology) -> Topology:
        """Create, or replace the spec of, a Topology. Status is kept. Returns the stored object."""
        ...

    def delete(self, namespace: str, name: str) -> bool:
        """Remove a Topology; False when it was not there."""
        ...

    def update_status(self, namespace: str, name: str, fn: StatusMutation, *,
                      known: Topology | None = None) -> Topology | None:
        """Compare-and-set the status: read, fn(current), write if the object did not change meanwhile;
        on a conflict read again and retry (bounded). Returns the stored Topology, None if it does
        not exist; raises StoreConflict when retries are exhausted.

        `known`, a copy the caller just read (with its resource_version), stands in for the first
        read: a write computed from it that is stale fails the compare and is retried from a fresh
        read, and a "nothing to change" verdict drawn from it is always confirmed by a fresh read
        (a stale copy must never be the reason a write is skipped)."""
        ...

    def update_link_states(self, namespace: str, name: str, container: str, states: Sequence[LinkStatus], *,
                           known: Topology) -> Topology | None:
        """Merge `states` into the pod's status (see `merge_link_states`) while the status belongs
        to sandbox `container`. The same outcome as `update_status` with that merge, but a store
        that can writes only the entries these states own (kube: a JSON patch guarded by tests of
        the container id and of each entry's uid, built from `known`), so the pod's own ADD and its
        peers' link-state updates do not fight over the status; when the guard fails (`known` was
        stale where it matters) it falls back to the compare-and-set."""
        ...

    def watch(self, namespace: str | None = None, *, stop: Callable[[], bool] = lambda: False,
              timeout: float = 1.0, on_list: Callable[[Sequence[Topology]], None] | None = None
              ) -> Iterator[WatchEvent]:
        """Changes after the call, until stop() is true (checked at least every `timeout` seconds).

        `on_list` is given, before the call returns, the Topologies the watch starts from (the list
        it takes anyway for its starting version): an informer fills its cache with it, so starting
        costs one LIST. A watch that has to list again later (its version expired) reports the
        difference as events."""
        ...

    def caught_up(self, timeout: float) -> bool:
        """Wait until this process's watches have handed out every change committed before the call
        (by any process), at most `timeout` seconds; False: they had not. A reader of a watch cache
        calls it first to read what a fresh read would give. A store that would need a request for
        it (Kubernetes: its watch is pushed, not polled) answers True at once."""
        ...

    def close(self) -> None: ...



CAS_TRIES = 50  # a writer can lose many rounds to busy peers; bounded, not starved


def backoff(attempt: int, *, first: float, doublings: int) -> None:
    """Pause after the `attempt`th lost compare-and-set round: up to `first` seconds, doubling per
    round `doublings` times. Jittered and growing, so writers that collided do not collide again
    in step. Each store passes its own pace (an API round trip is slower than a local file)."""
    time.sleep(random.uniform(0, first * (2 ** min(attempt, doublings))))


class CompareFailed(Exception):
    """Raised by a store's status write when the object changed since it was read."""


def update_status_cas(namespace: str, name: str, fn: StatusMutation, known: Topology | None, *,
                      read: Callable[[], Topology | None],
                      write: Callable[[Topology, TopologyStatus], Topology | None],
                      backoff: Callable[[int], None]) -> Topology | None:
    """The compare-and-set loop of `Store.update_status`, for every store.

    `read` gets the stored object (None: there is none); `write(current, status)` stores `status`
    only if the object is still `current` (else CompareFailed), returning the stored object or None
    when it is gone; `backoff(attempt)` pauses after a lost round against another writer.
    """
    hint = known if known is not None and known.resource_version and known.key == (namespace, name) else None
    # A caller's fresh copy saves the first read; only a confirmed read may end the loop without
    # writing (see Store.update_status).
    current = hint if hint is not None else read()
    confirmed = hint is None
    for attempt in range(CAS_TRIES):
        if current is None:
            return None
        status = fn(current)
        if status is None or status == current.status:
            if confirmed:
                return current
            current, confirmed = read(), True
            continue
        try:
            return write(current, status)
        except CompareFailed:
            if confirmed:  # a stale copy of the caller's is no contention: no pause for it
                backoff(attempt)
        current, confirmed = read(), True
    raise StoreConflict(f"Topology {namespace}/{name}: status update lost {CAS_TRIES} times in a row")


def merge_link_states(cur: Topology, container: str, states: Sequence[LinkStatus]) -> TopologyStatus | None:
    """`cur`'s status with `states` merged in by uid (sorted by uid), and `skipped` following them
    (a pending link waits for its peer pod, any other state does not); None when the status
    belongs to another sandbox than `container` or nothing changes."""
    if cur.status.container_id != container:
        return None  # a newer sandbox owns the status now
    by_uid = {s.uid: s for s in states}
    links = tuple(sorted([*(s for s in cur.status.links if s.uid not in by_uid), *by_uid.values()],
                         key=lambda s: s.uid))
    waiting = [s for s in cur.status.skipped if s.link_id not in by_uid]
    for uid, state in by_uid.items():
        link = cur.link(uid)
        if state.state == "pending" and link is not None:
            waiting.append(Skip(link.peer_pod, uid))
    new = replace(cur.status, links=links, skipped=tuple(sorted(waiting, key=lambda s: s.link_id)))
    return None if new == cur.status else new
