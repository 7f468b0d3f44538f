"""Labs the suite and the benchmarks make, each claimed by the process that made it, so that
`scripts/cleanup` (`make clean-netns`) can take down what a killed run left behind.

A lab's daemons, a CRI test's containerd and its shims run in sessions of their own: they outlive a
pytest killed with SIGKILL (or SIGTERM: Python then runs no `finally`), and the lab's namespaces
stay with them (the cleanup keeps a lab whose meshnetd runs: it may be someone's). A claim is a
record in OWNED_DIR (root's, like the labs) naming the lab, its directories, the cgroups and the
sandbox namespaces it made, and the claiming process (pid and start time, so a reused pid is not
taken for it). Normal teardown removes the record; the cleanup reaps the labs of records whose
process is gone. The record's shape is read back by scripts/cleanup (standard library only),
which checks every field before it acts.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

OWNED_DIR = Path(os.environ.get("MESHNET_OWNED_DIR", "/run/meshnet/owned"))


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[19])


class Claim:
    """The record of one lab; `add_*` as the lab grows, `release` once it is down."""

    def __init__(self, lab: str, lab_dir: Path, dirs: tuple[Path, ...] = ()) -> None:
        self.path = OWNED_DIR / f"{lab}.json"
        self._lock = threading.Lock()  # CRI sandboxes are run from several threads
        self._record: dict[str, object] = {
            "lab": lab, "dir": str(lab_dir), "dirs": [str(d) for d in dirs],
            "pid": os.getpid(), "start": start_time(os.getpid()), "cgroups": [], "netns": []}
        OWNED_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write()

    def add_dir(self, path: Path) -> None:
        self._add("dirs", str(path))

    def add_cgroup(self, parent: str) -> None:
        self._add("cgroups", parent)

    def add_netns(self, name: str) -> None:
        self._add("netns", name)

    def _add(self, key: str, value: str) -> None:
        with self._lock:
            values = self._record[key]
            assert isinstance(values, list)
            if value not in values:
                values.append(value)
                self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self._record, fh)
        tmp.replace(self.path)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
