"""A lab's names and its state file: everything a lab makes is named `mnl-<lab>-…` and recorded in
`<root>/<lab>/state.json`, so that `down` (in any later process) finds it all again."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnet.dryrun import UNDERLAY
from meshnet.plan import NodeInfo

LAB_ROOT = Path(os.environ.get("MESHNET_LAB_ROOT", "/run/meshnet/labs"))


class LabError(Exception):
    pass


def check_lab_name(name: str) -> str:
    if not name or len(name) > 12 or not name.replace("-", "").isalnum() or not name[0].isalnum():
        raise LabError(f"--name: {name!r} must be 1-12 letters, digits or '-'")
    return name


@dataclass
class PodRecord:
    name: str
    namespace: str
    node: str
    netns: str
    container_id: str = ""
    state: str = "new"  # new | adding | up | failed | down
    error: str = ""
    links: int = 0
    seconds: float = 0.0
    # The ADD result, kept as a runtime keeps it (libcni's cache): DEL and CHECK get it as prevResult.
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabState:
    name: str
    manifest: str
    nodes: list[str]
    store_url: str
    cni_bin: list[str]
    pods: dict[str, PodRecord] = field(default_factory=dict)
    daemons: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    # PATH the CNI binary is run with ("" = this process's): a kubelet host's, e.g. one without Python.
    cni_env_path: str = ""

    def head_json(self) -> str:
        """Every field but the pods, as the state file holds them."""
        return json.dumps({k: v for k, v in vars(self).items() if k != "pods"}, separators=(",", ":"))

    def changed_pods(self, memo: dict[str, tuple[dict[str, Any], str]],
                     among: Collection[str] | None = None) -> list[str]:
        """The records (all, or those named in `among`) whose fields differ from what `memo` says
        was last written, each encoded again into `memo` (see `save`)."""
        out = []
        for name in self.pods if among is None else [p for p in dict.fromkeys(among) if p in self.pods]:
            fields = vars(self.pods[name])
            hit = memo.get(name)
            if hit is None or hit[0] != fields:
                memo[name] = (dict(fields), f"{json.dumps(name)}:{json.dumps(fields, separators=(',', ':'))}")
                out.append(name)
        return out

    def append_changes(self, path: Path, pods: list[str], memo: dict[str, tuple[dict[str, Any], str]]) -> None:
        """Append the records of `pods` (encoded in `memo` by `changed_pods`) to the state file's
        change log (`changes_path(path)`), one JSON line each, in one write: what `load` replays
        over the file. A change costs its record, not the lab (see `StateFile`)."""
        lines = []
        for name in pods:
            piece = memo[name][1]
            lines.append(f'{{"pod":{piece[:len(json.dumps(name))]},"record":{piece[len(json.dumps(name)) + 1:]}}}\n')
        fd = os.open(changes_path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            data = "".join(lines).encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)

    def save(self, path: Path, memo: dict[str, tuple[dict[str, Any], str]] | None = None) -> None:
        # Written after every pod's ADD and DEL (under the lab's lock, so in turn): no deep copy
        # (`asdict` copies every kept ADD result) and no indentation, which cost more than the ADD.
        # `memo` (the StateFile's): each pod record's JSON as last written, with the field values
        # it was made from; only records whose fields changed are encoded again (a lab of 750 pods
        # wrote ~0.5 MB of JSON per ADD). Fields are replaced, never changed in place (a result
        # dict changed in place would compare equal to itself and keep its old JSON).
        head = self.head_json()
        pods = []
        for name, rec in self.pods.items():
            fields = vars(rec)
            hit = memo.get(name) if memo is not None else None
            if hit is None or hit[0] != fields:  # a dict comparison: C, each value by identity first
                hit = (dict(fields), f"{json.dumps(name)}:{json.dumps(fields, separators=(',', ':'))}")
                if memo is not None:
                    memo[name] = hit
            pods.append(hit[1])
        text = head[:-1] + ("," if len(head) > 2 else "") + '"pods":{' + ",".join(pods) + "}}"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        # Whole now: the change log's records are in it (removed after, so a crash between the
        # two leaves records that replay to what the file already says).
        changes_path(path).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> LabState:
        """The state file with its change log replayed over it."""
        return cls.load_counted(path)[0]

    @classmethod
    def load_counted(cls, path: Path) -> tuple[LabState, int, bool]:
        """(state, records in the change log, whether its last line was torn). A torn last line
        is a write cut short (the process died in it): its change was never reported done, so it
        is left out; any other line that is not a record is damage (ValueError)."""
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or not isinstance(raw.get("pods", {}), dict):
            raise ValueError("not a lab state object")
        raw["pods"] = {k: PodRecord(**v) for k, v in raw.get("pods", {}).items()}
        state = cls(**raw)
        try:
            text = changes_path(path).read_text()
        except FileNotFoundError:
            return state, 0, False
        lines = text.split("\n")
        torn = lines.pop() != ""  # a complete log ends with a newline
        count = 0
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
                name, record = entry["pod"], PodRecord(**entry["record"])
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"change log line {i + 1}: {type(e).__name__}: {e}") from e
            state.pods[name] = record
            count += 1
        return state, count, torn


def changes_path(state_path: Path) -> Path:
    """The change log beside a state file: pod records appended since the file was last written whole."""
    return state_path.with_suffix(".changes")


@dataclass(frozen=True)
class LabNames:
    """The names and paths of everything lab `name` makes (namespaces, sockets, logs)."""

    name: str
    dir: Path

    @property
    def prefix(self) -> str:
        return f"mnl-{self.name}-"

    def node_netns(self, i: int) -> str:
        return f"{self.prefix}node{i}"

    @property
    def external_netns(self) -> str:
        return f"{self.prefix}ext"

    def pod_netns(self, pod: str) -> str:
        return f"{self.prefix}p-{pod}"

    def socket(self, node: str) -> Path:
        return self.dir / f"{node}.sock"

    def topology_index(self, node: str) -> Path:
        """The node's index of Topologies, kept by its meshnetd, read by the shim while it is down."""
        return self.dir / f"{node}.topologies.json"

    @property
    def applied(self) -> Path:
        """A copy of the manifest text the lab last applied: `lab apply` compares an edited file with it."""
        return self.dir / "applied.yml"

    def log(self, node: str) -> Path:
        return self.dir / f"{node}.log"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def node_info(self, i: int) -> NodeInfo:
        return NodeInfo(f"node{i}", str(UNDERLAY[i + 1]), "eth0", self.node_netns(i))


class StateFile:
    """A lab's state file and this process's copy of it.

    Any number of `meshnetctl lab` processes may work on one lab at once, each with threads of its
    own: every change is a `transaction` — under an exclusive `flock` on `<lab>/lock` (and a thread
    lock), the file is read again, changed and written back atomically — so no process's change
    overwrites another's. Nothing slow (a CNI call, waiting for a daemon) runs inside one.

    A transaction that changed only pod records (the kubelet's, two per ADD) appends them to the
    change log beside the file instead of writing the file whole: written whole, each change cost
    the whole lab (750 pods: ~0.5 MB written and renamed over the old file, ~1.5 ms of CPU and
    2-3 ms under the lock, per change: half a GB for one `lab up`). The file is written whole
    (and the log removed) when anything else changed, after a torn append, and once the log holds
    as many records as the lab has pods (at least 64): a change costs its record, plus the whole
    lab once per that many changes."""

    def __init__(self, names: LabNames) -> None:
        self._names = names
        self._state: LabState | None = None
        self._lock = threading.RLock()
        self._depth = 0  # transactions of this process nest (the lock is re-entrant, the flock taken once)
        self._fd = -1
        self._in_transaction = False  # guarded by `_lock`
        self._loaded: tuple[int, ...] | None = None  # the file as this process last read or wrote it
        self._memo: dict[str, tuple[dict[str, Any], str]] = {}  # LabState.save's, guarded by `_lock`
        # The file as last read or written whole (guarded by `_lock`): its head, its pods' names in
        # order, the records in its change log and whether the log's last append was torn.
        self._head = ""
        self._names_written: list[str] = []
        self._logged = 0
        self._torn = False

    @property
    def path(self) -> Path:
        return self._names.state_path

    @property
    def lock_path(self) -> Path:
        return self._names.dir / "lock"

    def exists(self) -> bool:
        return self.path.exists()

    def _stamp(self) -> tuple[int, ...]:
        """The file's and its change log's identity and size (another process's write changes one)."""
        st = os.stat(self.path)
        try:
            log = os.stat(changes_path(self.path))
            logged: tuple[int, ...] = (log.st_ino, log.st_mtime_ns, log.st_ctime_ns, log.st_size)
        except FileNotFoundError:
            logged = ()
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, *logged

    def _load(self) -> LabState:
        if not self.path.exists():
            raise LabError(f"no lab named {self._names.name!r} (no {self.path})")
        try:
            self._loaded = self._stamp()
            state, self._logged, self._torn = LabState.load_counted(self.path)
            self._head, self._names_written = state.head_json(), list(state.pods)
            # The memo says what the file holds, not what this process wrote last: a record
            # another process changed, changed back here, must not look unchanged and be skipped.
            state.changed_pods(self._memo)
            for gone in set(self._memo) - set(state.pods):
                del self._memo[gone]
            return state
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise LabError(f"lab {self._names.name}: state file {self.path} is damaged ({type(e).__name__}: {e}); "
                           f"`meshnetctl lab down --name {self._names.name}` still removes the lab") from e

    @property
    def state(self) -> LabState:
        """This process's copy (read on first use, refreshed by every transaction)."""
        if self._state is None:
            self._state = self._load()
        return self._state

    def reload(self) -> LabState:
        """What the file says now (other processes may have changed it)."""
        with self.transaction() as st:
            return st

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The lab's inter-process lock (re-entrant within this process)."""
        with self._lock:
            if self._depth == 0:
                self._names.dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    os.close(self._fd)  # drops the flock
                    self._fd = -1

    @contextlib.contextmanager
    def transaction(self, pods: Collection[str] | None = None) -> Iterator[LabState]:
        """Read the file again, let the caller change it, write it back: all under the lab's lock.
        Nested in another transaction of this process, it is part of that one. `pods`: the caller
        changes only these pods' records (replacing fields, nothing else), so only they are
        compared with what was written (every record compared cost 0.7 ms per change at 750 pods)."""
        with self.locked():
            inner = self._in_transaction
            if not inner and (self._state is None or not self.path.exists() or self._stamp() != self._loaded):
                # Another process wrote it since this one read or wrote it last. Otherwise this
                # process's copy is the file's (with whatever a caller changed in it in place).
                self._state = self._load()
            self._in_transaction = True
            try:
                yield self.state
                if not inner:
                    self._save(pods)
            finally:
                self._in_transaction = inner

    def create(self, state: LabState) -> None:
        with self.locked():
            self._state = state
            self._save()

    def save(self) -> None:
        """Write this process's copy as it is (for a single-process caller that changed it in place)."""
        with self.locked():
            self._save()

    def _save(self, pods: Collection[str] | None = None) -> None:
        st = self.state
        head = st.head_json()
        if (head == self._head and not self._torn and list(st.pods) == self._names_written
                and self._logged < max(64, len(st.pods))):
            changed = st.changed_pods(self._memo, pods)
            if changed:
                try:
                    st.append_changes(self.path, changed, self._memo)
                except BaseException:
                    # Maybe part of a line went out: the next write is whole, and these records
                    # are not taken as written.
                    self._torn = True
                    for name in changed:
                        self._memo.pop(name, None)
                    raise
                self._logged += len(changed)
        else:
            st.save(self.path, self._memo)
            self._head, self._names_written, self._logged, self._torn = head, list(st.pods), 0, False
        self._loaded = self._stamp()

    def forget(self) -> None:
        """The lab is gone: the next access reads the file again (and finds none)."""
        self._state = None
        self._loaded = None
        self._head = ""  # a lab made again under this name is written whole first
