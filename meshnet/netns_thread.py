"""Running a little code inside a named network namespace without a process: a new thread enters
the namespace (`setns` moves only the calling thread), runs the function and ends, so no thread that
outlives the call is ever in a namespace other than its process's — never the daemon's main thread.

What the function opens there keeps the namespace: a socket (netlink, a listener) stays bound to
it after the thread is gone, and /proc/sys/net opened there is that namespace's."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from meshnet.naming import netns_problem

# Where `ip netns` keeps named namespaces (meshnet.daemon.netns and the lab use it from here).
NETNS_DIR = Path("/var/run/netns")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

T = TypeVar("T")


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _enter(netns: str) -> None:
    """The calling thread moves into the named namespace (its name checked first: never a path)."""
    why = netns_problem(netns)
    if why:
        raise OSError(f"namespace {netns!r}: {why}")
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """`fn()` run by a new thread inside the named namespace (under /run/netns); its result, or
    its exception raised here."""
    why = netns_problem(netns)
    if why:
        raise OSError(f"namespace {netns!r}: {why}")
    result = in_each_netns([netns], fn)[0]
    if isinstance(result, BaseException):
        raise result
    return result


def in_each_netns(names: Sequence[str], fn: Callable[[], T]) -> list[T | OSError]:
    """`fn()` run inside each named namespace in turn by one new thread (one thread for many
    namespaces: a pass over a node's pods enters hundreds), in order: each result, or the OSError
    that namespace gave (gone, a bad name). Any other exception is raised here."""
    results: list[T | OSError] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            for name in names:
                try:
                    _enter(name)
                    results.append(fn())
                except OSError as e:
                    results.append(e)
        except BaseException as e:  # handed to the caller
            error.append(e)

    t = threading.Thread(target=run, name=f"in-{names[0] if len(names) == 1 else 'netns'}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return results
