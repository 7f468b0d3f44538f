"""Limits a big lab meets on one machine, checked before bring-up: a node's pod network, and the
kernel's neighbour table.

Each lab node's pods get eth0 addresses from `POD_SUBNET` (host-local, on the node's own bridge),
which cannot grow: it is one of the two documentation ranges the lab may use, and only inside its
own namespaces. A node that would get more pods than it holds is refused up front, naming
`--nodes`, instead of failing minutes later with "no IP addresses available".

The neighbour (ARP/NDP) table is one for the whole machine, shared by every namespace; past
`gc_thresh3` entries the kernel refuses new ones ("neighbor table overflow", pings fail with "No
buffer space available"). The lab estimates what it needs and warns; `lab up --raise-neigh-limits`
raises the thresholds for the lab's life, recording the old values in the lab's directory, and
`lab down` puts them back (unless someone changed them since).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from pathlib import Path

from meshnet.lab.state import LabError
from meshnet.model import Manifest

PROC_SYS = Path("/proc/sys")
THRESHOLDS = ("gc_thresh1", "gc_thresh2", "gc_thresh3")
FAMILIES = ("ipv4", "ipv6")
SAVED = "neigh-limits.json"


def pod_capacity(subnet: str) -> int:
    """Pods one node's pod network holds: its addresses minus network, broadcast and the gateway."""
    return ipaddress.ip_network(subnet).num_addresses - 3


def check_pod_capacity(pods_per_node: Mapping[str, int], nodes: int, subnet: str) -> None:
    """Refuse a placement that gives a node more pods than its pod network holds."""
    capacity = pod_capacity(subnet)
    full = {n: c for n, c in pods_per_node.items() if c > capacity}
    if full:
        node, count = max(full.items(), key=lambda item: item[1])
        total = sum(pods_per_node.values())
        raise LabError(f"--nodes: {nodes} node(s) put {count} pods on {node}, but a node's pod network "
                       f"({subnet}) holds {capacity}; use --nodes {-(-total // capacity)} or more")


def neigh_entries(manifest: Manifest) -> int:
    """Neighbour entries a lab of `manifest` can need: 2 per addressed link end (each end learns its
    peer, on each address family it has) and 2 per pod (eth0 and its side of the node's bridge)."""
    ends = sum(1 for t in manifest.topologies for lnk in t.links if lnk.local_ip is not None)
    return 2 * ends + 2 * len(manifest.pods)


def _path(proc: Path, family: str, key: str) -> Path:
    return proc / "net" / family / "neigh" / "default" / key


def read_limits(proc: Path = PROC_SYS) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for family in FAMILIES:
        try:
            out[family] = {k: int(_path(proc, family, k).read_text().strip()) for k in THRESHOLDS}
        except (OSError, ValueError):
            continue  # no IPv6 on this kernel: nothing to check there
    return out


def neigh_warning(needed: int, proc: Path = PROC_SYS) -> str | None:
    """A warning when `needed` entries would not fit under gc_thresh3, saying how to raise it."""
    limits = read_limits(proc).get("ipv4")
    if limits is None or needed <= limits["gc_thresh3"]:
        return None
    new = target_limits(needed, limits)
    return (f"warning: this lab can need ~{needed} neighbour entries, but the kernel's neighbour table "
            f"(shared by all namespaces) holds {limits['gc_thresh3']} (net.ipv4.neigh.default.gc_thresh3): "
            f"pings may fail with 'No buffer space available'. Raise it with `sysctl -w "
            + " ".join(f"net.ipv4.neigh.default.{k}={v}" for k, v in new.items())
            + "` (and the same for ipv6), or run `lab up --raise-neigh-limits` (restored by `lab down`)")


def target_limits(needed: int, current: Mapping[str, int]) -> dict[str, int]:
    """Thresholds that fit `needed` entries with room to spare; never lower than `current`."""
    want = {"gc_thresh1": needed // 2, "gc_thresh2": needed, "gc_thresh3": 2 * needed}
    return {k: max(current[k], want[k]) for k in THRESHOLDS}


def raise_limits(lab_dir: Path, needed: int, proc: Path = PROC_SYS) -> dict[str, dict[str, int]]:
    """Raise the thresholds of both families to fit `needed` entries; what was there and what we
    set are recorded in `lab_dir` first (for `restore_limits`). Returns the values set."""
    current = read_limits(proc)
    new = {family: target_limits(needed, limits) for family, limits in current.items()}
    (lab_dir / SAVED).write_text(json.dumps({"old": current, "set": new}))
    for family, limits in new.items():
        for key, value in limits.items():
            if value != current[family][key]:
                _path(proc, family, key).write_text(f"{value}\n")
    return new


def restore_limits(lab_dir: Path, proc: Path = PROC_SYS) -> list[str]:
    """Put back the thresholds `raise_limits` recorded in `lab_dir` (a file that is there is
    untrusted input: only known keys, only integers). A value someone changed since we set it is
    left as it is. Returns problems (for `lab down` to print), never raises."""
    path = lab_dir / SAVED
    if not path.exists():
        return []
    problems: list[str] = []
    try:
        saved = json.loads(path.read_text())
        old, ours = saved["old"], saved["set"]
        now = read_limits(proc)
        for family in FAMILIES:
            for key in THRESHOLDS:
                if family not in old or family not in now:
                    continue
                before, set_to = int(old[family][key]), int(ours[family][key])
                if now[family][key] != set_to:
                    problems.append(f"net.{family}.neigh.default.{key} is {now[family][key]}, not the {set_to} "
                                    f"the lab set: left as it is (it was {before} before the lab)")
                elif before != set_to:
                    _path(proc, family, key).write_text(f"{before}\n")
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"cannot restore the neighbour table limits from {path}: {e}")
    return problems
