"""Giving the C heap's free pages back to the kernel after a large piece of work.

A 1500-link ADD, a peer's page of 512 far ends or a reconcile pass allocates megabytes that are
freed when it ends (rendered lines, batch texts, JSON documents, kernel views), much of it by
glibc's malloc in the arena of whichever thread did the work (meshnetd serves CNI calls, peer
requests and its passes on threads of their own). glibc keeps freed memory inside its heaps for
the next allocation, so the next piece of work on another thread starts from a higher floor and
the daemon's RSS only climbs. `malloc_trim(0)` releases the free pages of every arena
(madvise) at once: ~0.2 ms, measured in docs/performance.md ("Where the memory goes, wave 6").

Elsewhere than glibc (musl, macOS) there is no `malloc_trim` and `trim` does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def trim() -> None:
    """Release the C heap's free pages (glibc); called once a CNI call, a peer request or a
    reconcile pass is done."""
    if _TRIM is not None:
        _TRIM(0)
