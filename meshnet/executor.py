"""The only place that runs `ip` and `tc`: one `ip -batch -` (or `tc -batch -`) process per
namespace and phase.

Supports dry-run (record, run nothing), journals every command, maps `ip` failures onto typed
errors, and on a failed creation removes exactly what this run created before re-raising.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plumbum import local
from plumbum.commands.processes import CommandNotFound, ProcessTimedOut

from meshnet.command import Command, phases
from meshnet.plan import Capabilities
from meshnet.watchdog import WATCHDOG

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


class UnsafeCommand(ExecError):
    """A command refused before `ip` ran: not from a template, or an argument that could change
    what an `ip -batch` line means. The message names the value."""


# The last line of defence. `ip -batch` splits a line into words at blanks, gives quotes, '#' and
# '\' a meaning, and reads a word starting with '-' as an option. Values are checked before
# rendering and render keeps each value one argument (render._finalize); this makes a slip in
# either (or a status that bypassed the model) fail here, before anything runs.
_BAD_CHAR = re.compile(r"[\s\x00-\x1f\x7f-\x9f'\"\\#;]")
# What code builds by hand (rollback, garbage collection, the lab's set-up and routes): removals,
# namespaces, `link set`, addressing and routes. Creating links is a template's job only.
HAND_BUILT_VERBS = frozenset({("link", "del"), ("link", "set"), ("netns", "add"), ("netns", "del"),
                              ("addr", "replace"), ("route", "replace")})


def _value_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not text"
    if not value:
        return "is empty"
    bad = _BAD_CHAR.search(value)
    if bad:
        return f"contains {bad.group()!r} (whitespace, control characters, quotes, '#', '\\' and ';' are refused)"
    if value[0] == "-":
        return "starts with '-' (ip would read it as an option)"
    return None


def _plain_words(words: Sequence[str | None]) -> bool:
    """True if `_value_problem` finds nothing in any of `words`, found in three passes over their
    joined text (a batch's words at once, not a regex per word). Any doubt: False, and the
    word-by-word check that names the value runs."""
    try:
        joined = "".join(words)  # type: ignore[arg-type]  # a refused character in none: in no word
    except TypeError:  # a word that is no text (None included)
        return False
    # Whitespace is refused, so " -" in the words joined by blanks is a word starting with '-'.
    return all(words) and not _BAD_CHAR.search(joined) and " -" not in " " + " ".join(words)  # type: ignore[arg-type]


def check_command(command: Command, *, set_up: bool = False) -> None:
    """Raise UnsafeCommand unless `command` is safe to hand to `ip -batch` as one line.

    `set_up`: the lab's infrastructure (`Executor.run_sequence`), which code builds by hand.
    """
    origin = command.template or "hand-built"
    if not set_up and not command.template and command.argv[:2] not in HAND_BUILT_VERBS:
        allowed = ", ".join(sorted(" ".join(v) for v in HAND_BUILT_VERBS))
        raise UnsafeCommand(f"refused: {' '.join(map(repr, command.argv))[:200]} does not come from a "
                            f"template (commands built by hand may only: {allowed})", command)
    if command.netns is not None:
        why = _value_problem(command.netns)
        if why:
            raise UnsafeCommand(f"refused: namespace {command.netns!r:.200} {why} "
                                f"({origin}: ip -n ... {' '.join(command.argv[:2])})", command)
    for i, arg in enumerate(command.argv):
        why = _value_problem(arg)
        if why:
            raise UnsafeCommand(f"refused: argument {i + 1}, {arg!r:.200}, {why} "
                                f"({origin}: ip {' '.join(command.argv[:i])} ...)", command)


def check_commands(commands: Sequence[Command], *, set_up: bool = False) -> None:
    """Every command checked before the first one runs (a batch is never half refused)."""
    # The usual batch: template lines of plain words, checked all at once (three C-level passes
    # over the joined text instead of a call per line); any doubt, line by line as below.
    if not set_up and all(c.template for c in commands):
        try:
            spaces = {c.netns for c in commands} - {None}
        except TypeError:  # an unhashable namespace value: refused below, by name
            spaces = None
        if spaces is not None and _plain_words(list(spaces)) and _plain_words([w for c in commands for w in c.argv]):
            return
    for c in commands:
        check_command(c, set_up=set_up)


# Messages that mean "already gone": a deletion tolerates them.
_GONE = ("Cannot find device", "does not exist", "Cannot open network namespace", "No such device",
         "Cannot assign requested address",
         # tc: removing the impairments of an end that has none (the kernel's default qdisc)
         "Cannot delete qdisc with handle of zero", "Cannot find specified qdisc")


def _classify(stderr: str) -> type[CommandFailed]:
    if "File exists" in stderr:
        return LinkExists
    if "Cannot open network namespace" in stderr:
        return NetnsNotFound
    if "Cannot find device" in stderr or "No such device" in stderr:
        return LinkNotFound
    return CommandFailed


def _failure_level(stderr: str) -> str:
    # "File exists" is mostly a race its caller handles (a concurrent ADD or a restarted daemon got
    # there first; the caller logs `...-race-handled`): not an error unless the caller says so.
    return "info" if _classify(stderr) is LinkExists else "error"


@dataclass
class Journal:
    """What ran: in memory (bounded) and, when a path is given, appended as JSON lines."""

    path: Path | None = None
    keep: int = 10000
    entries: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, netns: str | None, batch: Sequence[Command], rc: int, seconds: float,
               error: str = "", lines: list[str] | None = None) -> dict[str, Any]:
        """`lines`: the batch's lines as `ip` read them, when the caller has them already."""
        entry: dict[str, Any] = {"ts": round(time.time(), 3), "netns": netns, "rc": rc, "ms": round(seconds * 1000, 2),
                 "commands": lines if lines is not None else [" ".join(c.argv) for c in batch]}
        if batch and batch[0].tool != "ip":
            entry["tool"] = batch[0].tool
        if error:
            entry["error"] = error.strip()
        with self._lock:
            if self.keep > 0:
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
                 timeout: float = 120.0, log: Callable[..., None] | None = None, tc: str = "tc",
                 unshare: str = "unshare") -> None:
        self._ip = local[ip]
        self._tools = {"ip": ip, "tc": tc, "unshare": unshare}  # tc is looked up when first used
        self._caps: Capabilities | None = None
        self._caps_lock = threading.Lock()
        self.dry_run = dry_run
        self.journal = journal if journal is not None else Journal()
        self.timeout = timeout
        self.recorded: list[Command] = []
        self._log = log

    def _batch(self, netns: str | None, batch: list[Command], *, force: bool) -> BatchOutcome:
        args = (["-n", netns] if netns else []) + (["-force"] if force else []) + ["-batch", "-"]
        # The batch as `ip` reads it, built once, as bytes: only that copy is alive while `ip` runs
        # (a 1500-link batch's text is ~0.25 MiB a copy, and its line objects ~0.3 MiB); the lines
        # for the journal and the log come back from it afterwards (no command holds a newline).
        stdin = "".join([" ".join(c.argv) + "\n" for c in batch]).encode()
        tool = batch[0].tool if batch else "ip"
        started = time.monotonic()
        try:
            program = self._ip if tool == "ip" else local[self._tools[tool]]
            rc, _, stderr = self._run(program, args, stdin)
        except ProcessTimedOut:
            rc, stderr = -1, f"timed out after {self.timeout}s"
        except CommandNotFound:
            # A node without `tc` (iproute2 without it): the batch fails as a typed CommandFailed.
            rc, stderr = -1, f"{self._tools[tool]}: command not found"
        elapsed = time.monotonic() - started
        lines = stdin.decode().split("\n")[:-1]
        del stdin
        entry = self.journal.record(netns, batch, rc, elapsed, stderr if rc else "", lines)
        if self._log is not None:
            # Every executed command reaches the log, so `kubectl logs` alone tells what meshnet did.
            self._log(event=f"{tool}-batch", netns=netns or ".", commands=len(batch), rc=rc,
                      ms=round(elapsed * 1000, 2), lines=entry["commands"],
                      **({"stderr": stderr.strip(), "level": _failure_level(stderr)} if rc else {}))
        return BatchOutcome(netns, batch, rc, stderr)

    def _run(self, program: Any, args: Sequence[str], stdin: bytes = b"") -> tuple[int, str, str]:
        """Run one process (through plumbum) to its end: (rc, stdout, stderr).

        Not plumbum's `(cmd << stdin).run(timeout=...)`: that writes the stdin data to a temporary
        file for every batch, and registers each process with plumbum's one timeout thread, which
        keeps it in its heap until its deadline (`timeout`, 120 s) even when it ended at once. An
        ADD under load paid for both (a fifth of meshnetd's CPU in the 100-pod run's profile, and
        every finished Popen held for two minutes). The pipe and the process-wide watchdog
        (meshnet.watchdog: no exit polling, no entry kept once the process ended) do the same job."""
        proc = program[list(args)].popen(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # Not communicate(timeout=...): it polls for the exit with sleeps (meshnet.watchdog).
            out, err = WATCHDOG.communicate(proc, stdin, self.timeout)
        except subprocess.TimeoutExpired as e:
            raise ProcessTimedOut(f"timed out after {self.timeout}s", proc.args) from e
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

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
        check_commands(commands)
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
        Only the lab builds its emulated infrastructure (bridges, underlay veths) this way, so any
        verb may come from code here; every argument is still checked.
        """
        check_commands(commands, set_up=True)
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

    def run_best_effort(self, commands: Sequence[Command]) -> list[str]:
        """Run every command (`ip -force`: a failure does not stop the batch), for tearing down.
        Failures because something is already gone are fine; returns the other errors."""
        check_commands(commands)
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
        self.run_best_effort(undo)

    def capabilities(self) -> Capabilities:
        """What this node's kernel offers link ends, probed once and cached: whether a netem qdisc
        can be made (the module may be missing, as on the project's own machines). The probe runs
        in a throw-away namespace of its own (`unshare -n`), which vanishes with the process:
        nothing to clean up, no interface of the node touched."""
        with self._caps_lock:
            if self._caps is None:
                self._caps = Capabilities(netem=self._probe_netem()) if not self.dry_run else Capabilities()
                if self._log is not None:
                    self._log(event="capabilities", netem=self._caps.netem)
            return self._caps

    def _probe_netem(self) -> bool:
        try:
            probe = local[self._tools["unshare"]]["-n", self._tools["tc"], "qdisc", "add", "dev", "lo", "root",
                                                  "netem", "delay", "1ms"]
            rc, _, _ = self._run(probe, ())
        except (CommandNotFound, ProcessTimedOut, OSError):
            return False  # cannot tell: report netem fields unavailable rather than fail ADDs
        return rc == 0

    def show(self, netns: str | None) -> list[dict[str, Any]]:
        """`ip -j -d addr show` in a namespace: links with their details and addresses in one call
        (the kernel's view, for CHECK and reconcile)."""
        args = (["-n", netns] if netns else []) + ["-j", "-d", "addr", "show"]
        rc, out, err = self._run(self._ip, args)
        if rc != 0:
            raise _classify(err)(err.strip() or f"ip link show failed ({rc})", None, err)
        return list(json.loads(out or "[]"))


def open_journal(path: str | Path | None, keep: int = 10000) -> Journal:
    """`keep`: entries held in memory as well (0: none; meshnetd reads none back, and 10000
    batches of a 1500-link lab held ~0.5 MiB per 1500-link build, kept for the daemon's life)."""
    return Journal(Path(path) if path else None, keep=keep)
