"""The network namespaces this daemon can vouch for: the node-local record of its own pods' sandboxes.

A pod's namespace comes only from the CNI call that set it up (ADD's CNI_NETNS, from the runtime),
never from the shared store: `status.net_ns` is written by whoever can write a status (every node's
service account), so a path read back from there could name the host's namespace or any other one.
The record keeps, per pod, the container and the namespace path the ADD was given, with the
namespace's inode, in memory (one dict lookup per use: no file read per CNI call) and written
through to one small file per node, atomically, so a restarted daemon finds its pods again. The
file is parsed strictly on start; an entry that is malformed or whose namespace is gone or changed
is dropped (and logged), never trusted; one whose namespace vanished meanwhile is kept so the
reconciler clears the pod's status.

Where the file lives: `--state-dir` (default: the directory of the daemon's socket, /run/meshnet on
a node). /run is a tmpfs: the file goes with a reboot, as every namespace it names does.

"A network namespace": the path's inode lives on nsfs (the same device as /proc/self/ns/net) and
`ioctl(NS_GET_NSTYPE)` answers CLONE_NEWNET. stat and ioctl work on the runtime's bind mounts and
on /proc/<pid>/ns/net alike, need no mount table parsing and cost two system calls; the daemon's
own namespace (the node's) and the host's (/proc/1/ns/net) are refused by inode.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshnet import naming
from meshnet.daemon import netns

PodKey = tuple[str, str]
Log = Callable[..., None]

_NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3)
_CLONE_NEWNET = 0x40000000
_VERSION = 1
_MAX_FILE = 4 << 20  # a node runs a few hundred pods at most: anything bigger is not ours


@dataclass(frozen=True)
class Sandbox:
    container_id: str
    netns: str  # the path the runtime handed to ADD
    ino: int  # that namespace's inode: a path reused for another namespace is not this one


def _ns_ino(path: str) -> int:
    return os.stat(path).st_ino


def netns_problem(path: str) -> str | None:
    """Why `path` is not a network namespace this daemon may touch (None: it is)."""
    if not isinstance(path, str) or not path or not path.startswith("/") or any(c in path for c in "\n\r\t\0 "):
        return f"{path!r} is not an absolute path"
    try:
        st = os.stat(path)
        nsfs = os.stat("/proc/self/ns/net")
    except OSError as e:
        return f"{path}: {e.strerror}"
    if st.st_dev != nsfs.st_dev:
        return f"{path} is not a namespace (not on nsfs)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"{path}: {e.strerror}"
    try:
        kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError as e:
        return f"{path}: NS_GET_NSTYPE: {e.strerror}"
    finally:
        os.close(fd)
    if kind != _CLONE_NEWNET:
        return f"{path} is not a network namespace"
    if st.st_ino == nsfs.st_ino:
        return f"{path} is the daemon's own (the node's) network namespace"
    try:
        if st.st_ino == os.stat("/proc/1/ns/net").st_ino:
            return f"{path} is the host's network namespace"
    except OSError:
        pass  # /proc/1 hidden (a pid namespace without it): nothing to compare with
    return None


class SandboxRecord:
    """The node-local record: {pod: Sandbox}, in memory, written through to `path` ("" = memory only)."""

    def __init__(self, path: str = "", log: Log | None = None) -> None:
        self.path = path
        self.log: Log = log or (lambda **_: None)
        self._lock = threading.Lock()  # guards `_pods` and the file
        self._pods: dict[PodKey, Sandbox] = {}
        self._reported: set[tuple[PodKey, str]] = set()
        # Each pod's entry as last encoded for the file, with the Sandbox it was made from (guarded
        # by `_lock`): a write encodes only what changed (the file is written on every ADD and
        # holds every pod of the node: 250 of them in a 750-router lab on 3 nodes).
        self._encoded: dict[PodKey, tuple[Sandbox, str]] = {}
        if path:
            self._load()

    # --- reading ---------------------------------------------------------------------------------

    def get(self, key: PodKey) -> Sandbox | None:
        with self._lock:
            return self._pods.get(key)

    def netns_of(self, key: PodKey, container_id: str) -> str:
        """The pod's namespace path if this daemon set it up for `container_id` and it still is the
        namespace it was (same inode); "" otherwise."""
        sb = self.get(key)
        if sb is None or sb.container_id != container_id:
            return ""
        try:
            return sb.netns if _ns_ino(sb.netns) == sb.ino else ""
        except OSError:
            return ""

    def report_once(self, key: PodKey, why: str) -> None:
        """Log that a pod the store puts on this node is not one we vouch for (once per reason)."""
        with self._lock:
            if (key, why) in self._reported:
                return
            self._reported.add((key, why))
        self.log(event="netns-not-vouched", pod=f"{key[0]}/{key[1]}", why=why)

    # --- writing ---------------------------------------------------------------------------------

    def put(self, key: PodKey, container_id: str, path: str) -> None:
        """Record the namespace an ADD was given (after `netns_problem` passed it)."""
        sb = Sandbox(container_id, path, _ns_ino(path))
        with self._lock:
            if self._pods.get(key) == sb:
                return
            self._pods[key] = sb
            self._reported = {r for r in self._reported if r[0] != key}
            self._save()

    def drop(self, key: PodKey, container_id: str | None = None) -> Sandbox | None:
        """Forget the pod (only its `container_id` sandbox, when given)."""
        with self._lock:
            sb = self._pods.get(key)
            if sb is None or (container_id is not None and sb.container_id != container_id):
                return None
            del self._pods[key]
            self._encoded.pop(key, None)
            self._save()
            return sb

    def release(self, sb: Sandbox) -> None:
        """Undo the `mnp-` bind mount this daemon made for the sandbox (runtime paths are left)."""
        netns.detach(naming.attached_netns_name(sb.netns))

    # --- the file --------------------------------------------------------------------------------

    def _save(self) -> None:
        if not self.path:
            return
        entries = []
        for k, s in sorted(self._pods.items()):
            hit = self._encoded.get(k)
            if hit is None or hit[0] != s:
                hit = (s, json.dumps({"namespace": k[0], "pod": k[1], "container_id": s.container_id,
                                      "netns": s.netns, "ino": s.ino}))
                self._encoded[k] = hit
            entries.append(hit[1])
        pods = ", ".join(entries)
        text = f'{{"version": {json.dumps(_VERSION)}, "pods": [{pods}]}}'
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            # Readers see the old file or the new one, never half of one. No fsync (it would cost
            # every ADD a disk flush): what a power loss could lose, a reboot's namespaces lose too.
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(_MAX_FILE + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            self.log(event="sandbox-record-unreadable", path=self.path, error=str(e))
            return
        entries = _parse(raw)
        if entries is None:
            self.log(event="sandbox-record-refused", path=self.path, why="not a sandbox record")
            entries = []
        for key, sb, why in entries:
            # A sandbox that vanished while the daemon was down is kept: the reconciler then finds
            # it gone (`netns_of` answers "") and clears the pod's status. Anything else that is not
            # a pod's network namespace now is dropped.
            if why is None and os.path.lexists(sb.netns):
                why = netns_problem(sb.netns)
            if why is not None:
                self.log(event="sandbox-dropped", pod=f"{key[0]}/{key[1]}", why=why)
                continue
            self._pods[key] = sb
        with self._lock:
            self._save()


def _parse(raw: bytes) -> list[tuple[PodKey, Sandbox, str | None]] | None:
    """Entries of the file with, for each, why it is refused (None: well-formed); None if the file
    as a whole is not one."""
    if len(raw) > _MAX_FILE:
        return None
    try:
        doc: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != _VERSION or not isinstance(doc.get("pods"), list):
        return None
    out: list[tuple[PodKey, Sandbox, str | None]] = []
    for item in doc["pods"]:
        if not isinstance(item, dict):
            continue
        ns, pod, cid, path, ino = (item.get(k) for k in ("namespace", "pod", "container_id", "netns", "ino"))
        if not isinstance(ns, str) or not isinstance(pod, str):
            continue
        why = (naming.k8s_name_problem(ns, label=True) or naming.k8s_name_problem(pod)
               or (None if isinstance(cid, str) and 0 < len(cid) <= 256 and cid.isprintable() and " " not in cid
                   else "container_id is not a container id")
               or (None if isinstance(ino, int) and not isinstance(ino, bool) and ino > 0 else "ino is not an inode")
               or (None if isinstance(path, str) else "netns is not a path"))
        out.append(((ns, pod), Sandbox(str(cid), str(path), ino if isinstance(ino, int) else 0), why))
    return out
