"""Per-phase timing of one CNI call, for `benchmarks/phases.py`: off by default, switched on by
MESHNET_TIMING=1 in the daemon's environment (read once, at import).

Off, `start()` hands out one shared recorder whose `mark` does nothing: an ADD pays one attribute
lookup per phase. On, each phase's wall time since the previous mark is kept and logged as one
`timing` event when the call ends. The recorder is also reachable from the call's thread
(`current()`), so code deeper down (the build's render and `ip`) can mark without being handed it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

ENABLED = os.environ.get("MESHNET_TIMING", "") == "1"


class Phases:
    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.marks: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        """`phase` took the time since the previous mark (several marks of one name add up)."""
        now = time.perf_counter()
        self.marks.append((phase, now - self.last))
        self.last = now

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for phase, seconds in self.marks:
            out[phase] = out.get(phase, 0.0) + seconds
        return {k: round(v * 1000, 2) for k, v in out.items()}


class _Off(Phases):
    def mark(self, phase: str) -> None:
        pass


_OFF = _Off()
_local = threading.local()


def start() -> Phases:
    """A recorder for the call this thread now serves (the shared no-op one when timing is off)."""
    p = Phases() if ENABLED else _OFF
    _local.phases = p
    return p


def current() -> Phases:
    return getattr(_local, "phases", _OFF)


def finish(p: Phases, log: Callable[..., None], **fields: object) -> None:
    """Log the call's phases as one `timing` event (nothing when timing is off)."""
    _local.phases = _OFF
    if p is _OFF:
        return
    p.mark("other")
    log(event="timing", total_ms=round((p.last - p.started) * 1000, 2), phases=p.summary(), **fields)
