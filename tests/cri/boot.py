"""Start containerd in a private mount namespace that still shares /run/netns with the host.

Run as `unshare --mount --propagation unchanged python boot.py --run-dir D --cni-lib D -- containerd ...`
(inside the node's network namespace, entered with `nsenter --net`, not `ip netns exec`: that one
makes every mount a slave, and the `cni-*` namespaces containerd creates would then stay invisible
to the host and to meshnetd). containerd 1.6 hard-codes `/run/containerd/s` (shim sockets) and
libcni's cache under `/var/lib/cni`; a tmpfs on /run and one on /var/lib keep both private. Every
mount of this namespace is made private first so that nothing mounted here (the tmpfs, the
snapshotter's overlays) reaches the host; only /run/netns keeps its peer group, re-attached on the
new /run. The namespace dies with its last process (containerd and its shims), and its mounts with it.

Standard library only: it runs before anything of the project is importable in that namespace.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

NETNS = "/run/netns"


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _mount_points() -> list[tuple[str, str]]:
    """(mount point, optional fields) of this namespace, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            # Octal escapes (\040 for a space) as the kernel writes them.
            point = fields[4].encode().decode("unicode_escape")
            out.append((point, " ".join(fields[6:sep])))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True, help="a private directory for the stash mount")
    parser.add_argument("--cni-lib", required=True, help="host directory shown as /var/lib/cni")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    points = _mount_points()
    shared_netns = [opt for point, opt in points if point == NETNS and "shared:" in opt]
    if not shared_netns:
        print(f"boot: {NETNS} is not a shared mount on this host (no `ip netns add` yet?)", file=sys.stderr)
        return 1
    for point, _opt in points:
        if point == NETNS or point.startswith(NETNS + "/"):
            continue
        subprocess.run(["mount", "--make-private", point], check=False, stderr=subprocess.DEVNULL)
    stash = os.path.join(args.run_dir, "netns")
    os.makedirs(stash, exist_ok=True)
    _mount("--bind", NETNS, stash)  # a bind of a shared mount is its peer: the host sees what lands here
    _mount("-t", "tmpfs", "-o", "mode=0755", "mnt-cri-run", "/run")
    os.makedirs(NETNS)
    _mount("--move", stash, NETNS)
    _mount("-t", "tmpfs", "-o", "mode=0755", "mnt-cri-varlib", "/var/lib")
    os.makedirs("/var/lib/cni")
    _mount("--bind", args.cni_lib, "/var/lib/cni")
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
