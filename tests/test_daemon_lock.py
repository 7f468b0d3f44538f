"""One meshnetd per node (issue 13): a second daemon for the same socket or node refuses to start,
naming the one that runs, and the first keeps serving. Real daemon processes (--single-node: no VTEP,
gRPC on loopback, an empty sqlite store, so they touch no interface)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnet.daemon.api import health_check
from meshnet.daemon.config import hold_instance_locks, parse_args

pytestmark = pytest.mark.root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _argv(tmp: Path, node: str, sock: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "meshnet.daemon.main", "--single-node", "--node-name", node,
            "--store", f"sqlite://{tmp / 'store.db'}", "--socket", str(sock), "--grpc-port", str(port),
            "--resync", "5"]


@pytest.fixture
def first(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    sock = tmp_path / "node-a.sock"
    proc = subprocess.Popen(_argv(tmp_path, "node-a", sock, _free_port()), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if health_check(str(sock), timeout=1.0).get("ready"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "meshnetd not ready in 30s"
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.parametrize("what", ["same socket", "same node, another socket"])
def test_a_second_daemon_for_the_node_refuses_to_start(tmp_path: Path, first: subprocess.Popen[bytes],
                                                        what: str) -> None:
    sock = tmp_path / ("node-a.sock" if what == "same socket" else "other.sock")
    second = subprocess.run(_argv(tmp_path, "node-a", sock, _free_port()), capture_output=True,
                            timeout=30, check=False)
    assert second.returncode != 0
    err = second.stderr.decode()
    assert f"another meshnetd (pid {first.pid}) already serves" in err, err
    assert ("socket " if what == "same socket" else "node node-a") in err
    # The first one still owns its socket and answers on it.
    assert first.poll() is None
    assert health_check(str(tmp_path / "node-a.sock"))["node"] == "node-a"


def test_another_node_beside_it_starts(tmp_path: Path, first: subprocess.Popen[bytes]) -> None:
    """The locks are per socket and per node: lab nodes side by side in one directory all start."""
    cfg = parse_args(["--node-name", "node-b", "--socket", str(tmp_path / "node-b.sock")], env={})
    fds = hold_instance_locks(cfg)
    assert len(fds) == 2
    for fd in fds:
        os.close(fd)


def test_the_lock_goes_with_the_process(tmp_path: Path) -> None:
    """A daemon killed with -9 leaves its lock file but not its lock: the next one starts."""
    args = ["--node-name", "node-c", "--socket", str(tmp_path / "c.sock")]
    code = ("import sys; from meshnet.daemon.config import hold_instance_locks, parse_args; "
            f"hold_instance_locks(parse_args({args!r}, env={{}})); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(SystemExit, match=f"pid {holder.pid}"):
            hold_instance_locks(parse_args(args, env={}))
    finally:
        holder.kill()
        holder.wait()
        for pipe in (holder.stdin, holder.stdout):
            if pipe:
                pipe.close()
    for fd in hold_instance_locks(parse_args(args, env={})):
        os.close(fd)


def test_a_sigterm_that_another_thread_receives_stops_the_daemon_promptly(first: subprocess.Popen[bytes]) -> None:
    """A process-directed signal goes to any thread that does not block it. Sent here to one of the
    daemon's other threads on purpose (tgkill): the main thread, waiting for the stop, must still
    notice within its wake-up period (it used to wait untimed: `lab down` sent SIGKILL after 10 s)."""
    import ctypes
    import signal

    sigterm_bit = 1 << (signal.SIGTERM - 1)
    others = []
    for task in Path(f"/proc/{first.pid}/task").iterdir():
        tid = int(task.name)
        try:  # a short-lived thread may end meanwhile
            blocked = next(int(line.split()[1], 16) for line in (task / "status").read_text().splitlines()
                           if line.startswith("SigBlk:"))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if tid != first.pid and not blocked & sigterm_bit:
            others.append(tid)
    assert others, "every other thread blocks SIGTERM: nothing to test"
    libc = ctypes.CDLL(None, use_errno=True)
    # The longest-lived threads first (lowest ids: the servers' and loops'); one that ended meanwhile
    # (ESRCH) is passed over.
    sent = any(libc.tgkill(first.pid, tid, signal.SIGTERM) == 0 for tid in sorted(others))
    assert sent, os.strerror(ctypes.get_errno())
    assert first.wait(timeout=5) == 0
