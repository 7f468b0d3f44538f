"""`meshnetctl init-wait N`: block until this network namespace has N interfaces besides `lo`.

Meant as a pod's init container (`meshnet.topo.kube` adds it with N = links + 1 for eth0): the
pod's main container then starts with every meshnet interface already there, which software that
reads the interface list once (qemu, many NOS images) needs. Reads `/sys/class/net`, which shows
the interfaces of the reader's network namespace (`ip netns exec` and container runtimes mount a
fresh sysfs for it); any interface names count.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

SYS_CLASS_NET = Path("/sys/class/net")


class InitWaitTimeout(Exception):
    pass


def interfaces(sys_class_net: Path = SYS_CLASS_NET) -> list[str]:
    """Interface names of the current network namespace, without `lo`, sorted."""
    return sorted(p.name for p in sys_class_net.iterdir() if p.name != "lo")


def wait_for_interfaces(count: int, *, timeout: float = 0.0, sleep: float = 1.0,
                        sys_class_net: Path = SYS_CLASS_NET,
                        progress: Callable[[str], None] | None = None) -> list[str]:
    """Return the interfaces once there are at least `count`; timeout 0 waits forever."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    last = -1
    while True:
        found = interfaces(sys_class_net)
        if len(found) >= count:
            return found
        if progress is not None and len(found) != last:
            progress(f"init-wait: {len(found)}/{count} interfaces ({', '.join(found) or 'none'})")
        last = len(found)
        if deadline is not None and time.monotonic() >= deadline:
            raise InitWaitTimeout(f"init-wait: timed out after {timeout:g}s with {len(found)} of {count} "
                                  f"interfaces besides lo ({', '.join(found) or 'none'}); are the pod's links "
                                  "in its Topology and its peers running?")
        time.sleep(sleep if deadline is None else max(0.0, min(sleep, deadline - time.monotonic())))


def run(count: int, timeout: float, sleep: float) -> int:
    if count < 0:
        print(f"init-wait: N must be 0 or more, not {count}", file=sys.stderr)
        return 2
    try:
        found = wait_for_interfaces(count, timeout=timeout, sleep=sleep,
                                    progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except InitWaitTimeout as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"init-wait: {len(found)} interfaces: {' '.join(found)}")
    return 0
