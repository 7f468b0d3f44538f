"""A lab's names and its state file: everything a lab makes is named `mnl-<lab>-…` and recorded in
`<root>/<lab>/state.json`, so that `down` (in any later process) finds it all again."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
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
    state: str = "new"  # new | up | failed | down
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

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> LabState:
        raw = json.loads(path.read_text())
        raw["pods"] = {k: PodRecord(**v) for k, v in raw.get("pods", {}).items()}
        return cls(**raw)


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

    def log(self, node: str) -> Path:
        return self.dir / f"{node}.log"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def node_info(self, i: int) -> NodeInfo:
        return NodeInfo(f"node{i}", str(UNDERLAY[i + 1]), "eth0", self.node_netns(i))


class StateFile:
    """The one in-memory copy of a lab's state and its file. Saved under a lock: pods are added
    and deleted from worker threads, and each of them saves."""

    def __init__(self, names: LabNames) -> None:
        self._names = names
        self._state: LabState | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._names.state_path

    def exists(self) -> bool:
        return self.path.exists()

    @property
    def state(self) -> LabState:
        if self._state is None:
            if not self.path.exists():
                raise LabError(f"no lab named {self._names.name!r} (no {self.path})")
            self._state = LabState.load(self.path)
        return self._state

    def create(self, state: LabState) -> None:
        self._state = state
        self.save()

    def save(self) -> None:
        with self._lock:
            self.state.save(self.path)

    def forget(self) -> None:
        """The lab is gone: the next access reads the file again (and finds none)."""
        self._state = None
