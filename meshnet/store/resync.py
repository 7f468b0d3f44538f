"""Catching a watch up after it lost events: compare what it last reported with the current state.

Both stores need it: the API server answers 410 Gone when a watch's resourceVersion was compacted
away, and the SQLite store prunes its change log. Either way the watcher re-lists and reports the
difference, as client-go's reflector does, so a consumer never misses a deletion.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from meshnet.model import Topology
from meshnet.store.base import WatchEvent

Key = tuple[str, str]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
# Event type names as the backends spell them, to the typed literal.
EVENT_TYPES: dict[str, EventType] = {"ADDED": "ADDED", "MODIFIED": "MODIFIED", "DELETED": "DELETED"}


def resync_events(known: dict[Key, Topology], current: Iterable[Topology]) -> list[WatchEvent]:
    """Events that turn `known` into `current`; updates `known` in place to `current`."""
    events: list[WatchEvent] = []
    fresh = {t.key: t for t in current}
    for key in sorted(known.keys() - fresh.keys()):
        events.append(WatchEvent("DELETED", known.pop(key)))
    for key in sorted(fresh):
        topology = fresh[key]
        before = known.get(key)
        if before is None:
            events.append(WatchEvent("ADDED", topology))
        elif before.resource_version != topology.resource_version:
            events.append(WatchEvent("MODIFIED", topology))
        known[key] = topology
    return events


def track(known: dict[Key, Topology], event: WatchEvent) -> None:
    """Keep `known` in step with an event that is handed to the consumer."""
    if event.type == "DELETED":
        known.pop(event.topology.key, None)
    else:
        known[event.topology.key] = event.topology
