"""Naming a runtime's network namespace for iproute2.

`ip -n NAME` only knows files under /var/run/netns. Runtimes hand CNI any path
(`/var/run/netns/cni-…`, `/proc/<pid>/ns/net`, `/var/run/docker/netns/…`); a bind mount of that
path under /var/run/netns (what `ip netns attach` does) makes any of them usable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from meshnet import naming
from meshnet.netns_thread import NETNS_DIR as NETNS_DIR  # defined below the daemon: rtnl reads it too

# Where iproute2 keeps named namespaces (and /run/netns, the same directory on most systems).
NETNS_DIRS = (str(NETNS_DIR), "/run/netns")

_MS_BIND = 4096
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsError(Exception):
    pass


def resolve(path: str) -> str:
    """The iproute2 name for a netns path, bind-mounting it under /var/run/netns when needed."""
    if not path:
        raise NetnsError("no network namespace path (CNI_NETNS is empty)")
    p = Path(path)
    if str(p.parent) in NETNS_DIRS and not naming.netns_problem(p.name):
        if not p.exists():
            raise NetnsError(f"network namespace {path} does not exist")
        return p.name
    if not p.exists():
        raise NetnsError(f"network namespace {path} does not exist")
    name = naming.attached_netns_name(path)
    target = NETNS_DIR / name
    if target.exists() and os.path.ismount(target):
        if os.stat(target).st_ino == os.stat(path).st_ino:
            return name
        detach(name)
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    target.touch(exist_ok=True)
    if _libc.mount(str(p).encode(), str(target).encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        target.unlink(missing_ok=True)
        raise NetnsError(f"cannot attach {path} as {target}: {os.strerror(err)}")
    return name


def detach(name: str) -> None:
    """Undo `resolve`'s bind mount (only our own `mnp-` names; runtime-owned ones are left alone)."""
    if not name.startswith("mnp-"):
        return
    target = NETNS_DIR / name
    _libc.umount2(str(target).encode(), _MNT_DETACH)
    target.unlink(missing_ok=True)


def release(path: str) -> bool:
    """Undo `resolve`'s bind mount for a runtime path whose namespace is gone (the sandbox vanished
    without a DEL): the mount alone would keep the namespace, and meshnet's interfaces in it, alive.
    True when a mount was released."""
    if not path or Path(path).exists():
        return False
    p = Path(path)
    if str(p.parent) in NETNS_DIRS and not naming.netns_problem(p.name):
        return False  # named by the runtime itself: never attached, not ours
    name = naming.attached_netns_name(path)
    if not (NETNS_DIR / name).exists():
        return False
    detach(name)
    return True


def exists(path: str) -> bool:
    return bool(path) and Path(path).exists()
