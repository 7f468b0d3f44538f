"""Running a little code inside a lab namespace without a process: a new thread enters the
namespace (`setns` moves only the calling thread), runs the function and ends, so no thread that
outlives the call is ever in a namespace other than its process's.

What the function opens there keeps the namespace: a socket (netlink, a listener) stays bound to
it after the thread is gone, and /proc/sys/net opened there is that namespace's."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from meshnet.daemon.netns import NETNS_DIR
from meshnet.naming import netns_problem

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

T = TypeVar("T")


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """`fn()` run by a new thread inside the named namespace (under /run/netns); its result, or
    its exception raised here."""
    why = netns_problem(netns)
    if why:
        raise OSError(f"namespace {netns!r}: {why}")
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # handed to the caller
            error.append(e)

    t = threading.Thread(target=run, name=f"in-{netns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
