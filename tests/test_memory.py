"""meshnetd hands the C heap's free pages back after large pieces of work (meshnet.daemon.memory)."""

from __future__ import annotations

import platform

import pytest

from meshnet.daemon import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_finds_glibc_malloc_trim() -> None:
    # Not found, `trim` would silently do nothing and the daemon's RSS only climb again.
    assert memory._TRIM is not None
    before = bytearray(8 << 20)  # freed below: glibc has something to hand back
    del before
    memory.trim()
