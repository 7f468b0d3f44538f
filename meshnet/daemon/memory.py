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
import threading
import time
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


# How long `trim_soon` waits: the answer to the call that asked goes out first, and the calls of a
# burst are trimmed after once.
TRIM_DELAY = 0.02
_wanted = threading.Event()
_started = False
_start_lock = threading.Lock()


def trim_soon() -> None:
    """`trim` on a thread of its own, a moment from now: off the path of the CNI call or peer
    request that freed the memory (trimming a heap a 1500-link call left took milliseconds, which
    its caller waited for: the hot-change figure went from 0.105 to 0.110 s with it inline)."""
    global _started
    if _TRIM is None:
        return
    if not _started:
        with _start_lock:
            if not _started:
                threading.Thread(target=_trimmer, name="memory-trim", daemon=True).start()
                _started = True
    _wanted.set()


def _trimmer() -> None:
    while True:
        _wanted.wait()
        _wanted.clear()
        time.sleep(TRIM_DELAY)
        trim()
