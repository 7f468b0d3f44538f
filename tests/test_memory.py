"""meshnetd hands the C heap's free pages back after large pieces of work (meshnet.daemon.memory)."""

from __future__ import annotations

import platform
import time

import pytest

from meshnet.daemon import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_finds_glibc_malloc_trim() -> None:
    # Not found, `trim` would silently do nothing and the daemon's RSS only climb again.
    assert memory._TRIM is not None
    before = bytearray(8 << 20)  # freed below: glibc has something to hand back
    del before
    memory.trim()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_soon_trims_on_a_thread_of_its_own_once_per_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """CNI calls and peer requests ask for a trim as they end; it runs after their answer, on the
    trimmer's thread, and a burst of asks is one trim."""
    import threading

    calls: list[str] = []
    done = threading.Event()

    def recorded() -> None:
        calls.append(threading.current_thread().name)
        done.set()

    monkeypatch.setattr(memory, "trim", recorded)
    for _ in range(20):
        memory.trim_soon()
    assert done.wait(5)
    time.sleep(3 * memory.TRIM_DELAY)
    assert calls and set(calls) == {"memory-trim"} and len(calls) <= 2
