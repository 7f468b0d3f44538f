"""A child process bounded by a deadline, without polling for its exit.

`Popen.communicate(timeout=...)` (and `subprocess.run(timeout=...)`) exchanges the pipes, then
waits for the exit in a loop of non-blocking `waitpid` calls and sleeps of 1, 2, 4 ... ms. A child
closes its pipes a moment before it exits, so nearly every call found it still running and slept
at least a millisecond: an `ip -batch` took 2.1 ms that way against 1.6 ms without a timeout, and
an ADD waits for several of them one after the other (its batches, the eth0 delegate; the lab's
kubelet for the CNI binary). Here the exchange and the wait are `communicate()` without a timeout
(a blocking `waitpid` at the end), and one watchdog thread kills a child whose deadline passes,
which ends the exchange. The thread sleeps until the earliest deadline (at most IDLE_WAKE), so a
child that ends in time costs two short lock holds and no wake-up.

Standard library only: the CNI modules (the eth0 delegate) use it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any

IDLE_WAKE = 1.0


class Watchdog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, Any, bool]] = {}  # token -> (deadline, the Popen, group)
        self._expired: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the thread wakes next by itself (it checks the deadlines then)

    def communicate(self, proc: Any, input: bytes | None, timeout: float, *,
                    group: bool = False) -> tuple[bytes, bytes]:
        """`proc.communicate(input)`, the child killed once `timeout` seconds have passed; then
        subprocess.TimeoutExpired (the output read until the kill attached), as with communicate's
        own timeout. `proc`: a subprocess.Popen with its pipes (or what wraps one, as plumbum's).
        `group`: the child leads its own process group (start_new_session), killed whole: what it
        started (a CNI plugin's IPAM plugin) would otherwise hold the pipes open past the kill."""
        token = self._watch(proc, timeout, group)
        try:
            out, err = proc.communicate(input)
        finally:
            expired = self._forget(token)
        if expired:
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err)
        return out, err

    def pending(self) -> int:
        """Children being watched now (0 when no call is under way)."""
        with self._cond:
            return len(self._due)

    def _watch(self, proc: Any, timeout: float, group: bool) -> int:
        due = time.monotonic() + timeout
        with self._cond:
            self._next += 1
            token = self._next
            self._due[token] = (due, proc, group)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
                self._thread.start()
            elif due < self._wake_at:  # else it wakes in time anyway: no wake-up per call
                self._cond.notify()
        return token

    def _forget(self, token: int) -> bool:
        with self._cond:
            self._due.pop(token, None)
            if token in self._expired:
                self._expired.discard(token)
                return True
            return False

    def _loop(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for token, (due, proc, group) in list(self._due.items()):
                    if due <= now:
                        del self._due[token]
                        self._expired.add(token)
                        _kill(proc, group)
                # Idle, it still looks every IDLE_WAKE seconds: a call due later than that (every
                # caller's timeout is longer) then needs no notify, which would wake this thread
                # (and take the GIL from the caller's) once per call.
                self._wake_at = min((d for d, _, _ in self._due.values()), default=now + IDLE_WAKE)
                self._cond.wait(self._wake_at - now)


def _kill(proc: Any, group: bool) -> None:
    with suppress(OSError):  # it ended meanwhile
        proc.kill()
    # Its group too, while the child is not reaped (the group's id cannot be reused before): only
    # a real process, never a test's fake one (its pid is nobody's).
    if group and isinstance(proc, subprocess.Popen) and proc.returncode is None:
        with suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)


WATCHDOG = Watchdog()  # one per process: its thread starts with the first call


def run(argv: Sequence[str], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
        timeout: float) -> subprocess.CompletedProcess[bytes]:
    """`subprocess.run(argv, input=..., env=..., capture_output=True, timeout=...)` through the
    watchdog: subprocess.TimeoutExpired once the child (and what it started: its own session)
    was killed at its deadline."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(env) if env is not None else None, start_new_session=True)
    with proc:
        out, err = WATCHDOG.communicate(proc, input, timeout, group=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
