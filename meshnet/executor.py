"""The only place that runs `ip`: one `ip -batch -` process per namespace and phase.

Supports dry-run (record, run nothing), journals every command, maps `ip` failures onto typed
errors, and on a failed creation removes exactly what this run created before re-raising.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plumbum import local
from plumbum.commands.processes import ProcessTimedOut

from meshnet.command import Command, phases

_FAILED_LINE = re.compile(r"Command failed -:(\d+)")


class ExecError(Exception):
    """An `ip` batch failed. `command` is the failing command (when `ip` said which)."""

    def __init__(self, message: str, command: Command | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.command = command
        self.stderr = stderr


class CommandFailed(ExecError):
    pass


class LinkExists(CommandFailed):
    pass


class LinkNotFound(CommandFailed):
    pass


class NetnsNotFound(CommandFailed):
    pass


# Messages that mean "already gone": a deletion tolerates them.
_GONE = ("Cannot find device", "does not exist", "Cannot open network namespace", "No such device",
         "Cannot assign requested address")


def _classify(stderr: str) -> type[CommandFailed]:
    if "File exists" in stderr:
        return LinkExists
    if "Cannot open network namespace" in stderr:
        return NetnsNotFound
    if "Cannot find device" in stderr or "No such device" in stderr:
        return LinkNotFound
    return CommandFailed


@dataclass
class Journal:
    """What ran: in memory (bounded) and, when a path is given, appended as JSON lines."""

    path: Path | None = None
    keep: int = 10000
    entries: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, netns: str | None, batch: Sequence[Command], rc: int, seconds: float,
               error: str = "") -> dict[str, Any]:
        entry: dict[str, Any] = {"ts": round(time.time(), 3), "netns": netns, "rc": rc, "ms": round(seconds * 1000, 2),
                 "commands": [" ".join(c.argv) for c in batch]}
        if error:
            entry["error"] = error.strip()
        with self._lock:
            self.entries.append(entry)
            del self.entries[: max(0, len(self.entries) - self.keep)]
            if self.path is not None:
                with self.path.open("a") as fh:
                    fh.write(json.dumps(entry) + "\n")
        return entry


@dataclass
class BatchOutcome:
    netns: str | None
    batch: list[Command]
    rc: int
    stderr: str

    @property
    def failed_index(self) -> int | None:
        """0-based index of the batch line `ip` stopped at, or None."""
        if self.rc == 0:
            return None
        m = _FAILED_LINE.search(self.stderr)
        return int(m.group(1)) - 1 if m else None


class Executor:
    def __init__(self, ip: str = "ip", *, dry_run: bool = False, journal: Journal | None = None,
                 timeout: float = 120.0, log: Callable[..., None] | None = None) -> None:
        self._ip = local[ip]
        self.dry_run = dry_run
        self.journal = journal if journal is not None else Journal()
        self.timeout = timeout
        self.recorded: list[Command] = []
        self._log = log

    def _batch(self, netns: str | None, batch: list[Command], *, force: bool) -> BatchOutcome:
        args = (["-n", netns] if netns else []) + (["-force"] if force else []) + ["-batch", "-"]
        stdin = "".join(" ".join(c.argv) + "\n" for c in batch)
        started = time.monotonic()
        try:
            rc, _, stderr = (self._ip[args] << stdin).run(retcode=None, timeout=self.timeout)
        except ProcessTimedOut:
            rc, stderr = -1, f"timed out after {self.timeout}s"
        elapsed = time.monotonic() - started
        entry = self.journal.record(netns, batch, rc, elapsed, stderr if rc else "")
        if self._log is not None:
            # Every executed command reaches the log, so `kubectl logs` alone tells what meshnet did.
            self._log(event="ip-batch", netns=netns or ".", commands=len(batch), rc=rc,
                      ms=round(elapsed * 1000, 2), lines=entry["commands"],
                      **({"stderr": stderr.strip()} if rc else {}))
        return BatchOutcome(netns, batch, rc, stderr)

    def _run_phase(self, phase: list[tuple[str | None, list[Command]]], *, force: bool) -> list[BatchOutcome]:
        if len(phase) == 1:
            ns, batch = phase[0]
            return [self._batch(ns, batch, force=force)]
        # Batches of one phase touch different namespaces and do not depend on each other.
        results: list[BatchOutcome | None] = [None] * len(phase)

        def work(i: int) -> None:
            results[i] = self._batch(phase[i][0], phase[i][1], force=force)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(1, len(phase))]
        for t in threads:
            t.start()
        work(0)
        for t in threads:
            t.join()
        return [r for r in results if r is not None]

    def apply(self, commands: Sequence[Command]) -> None:
        """Run commands that build links; on failure remove what this call created, then raise."""
        if self.dry_run:
            self.recorded.extend(commands)
            return
        created: list[tuple[str | None, str]] = []
        for phase in phases(commands):
            outcomes = self._run_phase(phase, force=False)
            failure: BatchOutcome | None = None
            for out in outcomes:
                done = out.batch if out.rc == 0 else out.batch[: out.failed_index or 0]
                created.extend(c for c in (cmd.creates for cmd in done) if c is not None)
                if out.rc != 0 and failure is None:
                    failure = out
            if failure is not None:
                self.rollback(created)
                idx = failure.failed_index
                bad = failure.batch[idx] if idx is not None and idx < len(failure.batch) else None
                detail = failure.stderr.strip().splitlines()
                msg = detail[0] if detail else f"ip exited {failure.rc}"
                where = f"in namespace {failure.netns}" if failure.netns else "in the node namespace"
                text = f"{msg} ({where}: ip {' '.join(bad.argv) if bad else '-batch'})"
                raise _classify(failure.stderr)(text, bad, failure.stderr)

    def run_sequence(self, commands: Sequence[Command]) -> None:
        """Run commands strictly in the given order (consecutive ones of a namespace share a batch).

        For set-up steps whose order matters across namespaces (`netns add` before `link add ...
        netns`), which `apply`'s phases would reorder. No rollback: callers tear down by namespace.
        """
        if self.dry_run:
            self.recorded.extend(commands)
            return
        i = 0
        while i < len(commands):
            j = i
            while j < len(commands) and commands[j].netns == commands[i].netns:
                j += 1
            out = self._batch(commands[i].netns, list(commands[i:j]), force=False)
            if out.rc != 0:
                idx = out.failed_index
                bad = out.batch[idx] if idx is not None and idx < len(out.batch) else None
                raise _classify(out.stderr)(f"{out.stderr.strip()} ({bad.shell() if bad else 'ip -batch'})",
                                            bad, out.stderr)
            i = j

    def remove(self, commands: Sequence[Command]) -> list[str]:
        """Run commands that tear links down; what is already gone is fine. Returns other errors."""
        if self.dry_run:
            self.recorded.extend(commands)
            return []
        problems: list[str] = []
        for phase in phases(commands):
            for out in self._run_phase(phase, force=True):
                if out.rc == 0:
                    continue
                for line in out.stderr.splitlines():
                    if line.startswith("Command failed") or not line.strip():
                        continue
                    if not any(g in line for g in _GONE):
                        problems.append(line.strip())
        return problems

    def rollback(self, created: Sequence[tuple[str | None, str]]) -> None:
        if not created:
            return
        undo = [Command(ns, ("link", "del", name)) for ns, name in reversed(created)]
        self.remove(undo)

    def show(self, netns: str | None) -> list[dict[str, Any]]:
        """`ip -j -d addr show` in a namespace: links with their details and addresses in one call
        (the kernel's view, for CHECK and reconcile)."""
        args = (["-n", netns] if netns else []) + ["-j", "-d", "addr", "show"]
        rc, out, err = self._ip[args].run(retcode=None, timeout=self.timeout)
        if rc != 0:
            raise _classify(err)(err.strip() or f"ip link show failed ({rc})", None, err)
        return list(json.loads(out or "[]"))


def open_journal(path: str | Path | None) -> Journal:
    return Journal(Path(path) if path else None)
