"""A throw-away emulated cluster (`meshnet.lab.cluster.Lab`) for root tests; always torn down.

    from tests.labkit import lab_up, failed_pings

    with lab_up(tmp_path, "tests/3node.yml", nodes=3) as lab:        # or manifest text
        assert failed_pings(lab) == []

The lab gets a unique short name (`t` + 5 hex digits). On exit, whatever happened inside,
`Lab.down()` runs; then the exit asserts that nothing of the lab survived: no `mnl-<lab>-`
namespace, no meshnetd process of the lab, no lab directory, and that every DEL succeeded.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshnet.daemon.netns import NETNS_DIR
from meshnet.lab.cluster import Lab
from tests.owned import Claim

# A unix socket path is at most 107 bytes; the lab puts `<root>/<lab>/<node>.sock` there.
_MAX_ROOT = 70


def lab_leftovers(lab: Lab) -> list[str]:
    """What is left of `lab` on the machine: namespaces, daemon processes, its directory."""
    left = sorted(f"netns {p.name}" for p in NETNS_DIR.glob(f"{lab.prefix}*")) if NETNS_DIR.exists() else []
    marker = str(lab.dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        if b"meshnet.daemon.main" in cmdline and marker in cmdline and stat.split(") ", 1)[1][:1] != "Z":
            left.append(f"meshnetd pid {proc.name}")
    if lab.dir.exists():
        left.append(f"directory {lab.dir}")
    return left + host_network_trespass()


def host_network_trespass() -> list[str]:
    """Anything of ours on this machine's own network namespace: an interface named like ours or an
    address in the documentation ranges the labs use (a bridge plugin run outside a node's namespace
    once put 203.0.113.1/24 on the host, which took the route to the package mirror with it)."""
    import ipaddress
    import json
    import subprocess

    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    ranges = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("203.0.113.0/24")]
    found = []
    for entry in json.loads(out or "[]"):
        name = str(entry.get("ifname", ""))
        if name.startswith(("mnl", "mnt", "mnb", "mnd", "mnp-")):
            found.append(f"host interface {name}")
        for a in entry.get("addr_info", ()):
            ip = ipaddress.ip_address(a.get("local", "0.0.0.0"))
            if any(ip in r for r in ranges):
                found.append(f"host address {ip} on {name}")
    return found


def failed_pings(lab: Lab) -> list[dict[str, Any]]:
    """Every ping of `Lab.connectivity()` that failed (so `== []` shows what broke)."""
    return [c for c in lab.connectivity() if not c["ok"]]


@contextmanager
def lab_up(tmp_path: Path, manifest: str | Path, nodes: int = 1, store: str = "sqlite",
           kubeconfig: str | Path = "", workers: int = 8, cni_bin: list[str] | None = None,
           cni_env_path: str = "") -> Iterator[Lab]:
    """Bring a lab up from a manifest file or manifest text (`workers` concurrent pod ADDs); yield it;
    always take it down."""
    short_root: Path | None = None
    root = tmp_path
    if len(str(root)) > _MAX_ROOT:
        root = short_root = Path(tempfile.mkdtemp(prefix="mnl", dir="/tmp"))
    text = str(manifest)
    if "\n" in text:  # manifest text, not a path
        path = root / "manifest.yml"
        path.write_text(text)
        text = str(path)
    lab = Lab(f"t{secrets.token_hex(3)[:5]}", root=root)
    claim = Claim(lab.name, lab.dir, (short_root,) if short_root is not None else ())
    problems: list[str] = []
    try:
        lab.up(text, nodes, store=store, kubeconfig=str(kubeconfig), workers=workers, cni_bin=cni_bin,
               cni_env_path=cni_env_path)
        yield lab
    finally:
        try:
            problems = lab.down()
        finally:
            left = lab_leftovers(lab)
            if short_root is not None:
                shutil.rmtree(short_root, ignore_errors=True)
            if not left:  # else the record stays: the next `make clean-netns` reaps what is left
                claim.release()
            assert not left, f"lab {lab.name} left behind: {left}"
    assert not problems, f"lab {lab.name}: tearing down failed: {problems}"
