"""meshnet.watchdog: children bounded by a deadline without polling for their exit (real processes)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meshnet import watchdog
from meshnet.command import Command
from meshnet.executor import ExecError, Executor
from meshnet.watchdog import Watchdog


def test_a_child_that_ends_in_time_gives_its_output_and_the_caller_never_sleeps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """communicate(timeout=...) waits for the exit in a loop of sleeps (1, 2, 4 ... ms); a child
    closes its pipes just before it exits, so nearly every call slept. Here no call sleeps."""
    me = threading.current_thread()
    slept: list[float] = []
    sleep = time.sleep

    def counted(seconds: float) -> None:
        if threading.current_thread() is me:
            slept.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", counted)
    done = watchdog.run(["sh", "-c", 'cat; echo "$0" >&2', "run"], input=b"in\n", timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"in\n", b"run\n")
    # `ip link show` made subprocess.run(timeout=...) sleep in 42 of 50 calls here.
    for _ in range(20):
        done = watchdog.run(["ip", "link", "show", "lo"], timeout=30)
        assert done.returncode == 0 and b"lo:" in done.stdout
    assert slept == []
    assert watchdog.WATCHDOG.pending() == 0


def test_a_child_past_its_deadline_is_killed_and_the_call_raises() -> None:
    dog = Watchdog()
    proc = subprocess.Popen(["sh", "-c", "echo started; exec sleep 30"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with proc, pytest.raises(subprocess.TimeoutExpired) as raised:
        dog.communicate(proc, b"", 0.3)
    assert proc.returncode == -9
    assert raised.value.output == b"started\n" and raised.value.timeout == 0.3
    assert dog.pending() == 0


def test_an_earlier_deadline_is_kept_while_a_later_one_is_pending() -> None:
    """The thread sleeps until the earliest deadline: a child watched after one with a long
    deadline, but due before it, is still killed on time (not when the first one is due)."""
    dog = Watchdog()
    hung = [subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]
    outcome: dict[str, Any] = {}

    def wait(name: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
        try:
            outcome[name] = dog.communicate(proc, None, timeout)
        except subprocess.TimeoutExpired as e:
            outcome[name] = e

    long_one = threading.Thread(target=wait, args=("long", hung[0], 60.0))
    long_one.start()
    while dog.pending() == 0:
        time.sleep(0.01)
    started = time.monotonic()
    wait("short", hung[1], 0.3)
    assert isinstance(outcome["short"], subprocess.TimeoutExpired)
    assert time.monotonic() - started < 30, "killed only when the long deadline woke the watchdog"
    assert dog.pending() == 1 and long_one.is_alive()
    hung[0].kill()  # ends the long one's exchange: not a timeout
    long_one.join(10)
    assert outcome["long"] == (b"", b"") and dog.pending() == 0
    for p in hung:
        p.wait()
        for pipe in (p.stdin, p.stdout, p.stderr):
            assert pipe is not None
            pipe.close()


def test_many_children_at_once_each_get_their_own_outcome() -> None:
    """Those that hang start a child of their own holding the pipes (as a CNI plugin runs its IPAM
    plugin): the whole group goes, else the exchange would wait for that child."""
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        hang = i % 4 == 0
        try:
            results[i] = watchdog.run(["sh", "-c", "sleep 60; true" if hang else f"echo {i}"],
                                      timeout=0.5 if hang else 60).stdout
        except subprocess.TimeoutExpired:
            results[i] = "timeout"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: "timeout" if i % 4 == 0 else f"{i}\n".encode() for i in range(16)}
    assert watchdog.WATCHDOG.pending() == 0


def test_an_ip_batch_that_hangs_fails_as_timed_out(tmp_path: Path) -> None:
    """The executor's `ip` bounded by its timeout: the batch fails, typed, naming the timeout."""
    fake_ip = tmp_path / "ip"
    fake_ip.write_text("#!/bin/sh\nexec sleep 60\n")
    fake_ip.chmod(0o755)
    executor = Executor(ip=str(fake_ip), timeout=0.3)
    with pytest.raises(ExecError, match=r"timed out after 0.3s"):
        executor.apply([Command("mnt-none", ("link", "set", "lo", "up"))])
