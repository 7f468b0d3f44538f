"""`meshnetctl install-cni` and `meshnetctl health`: what a Kubernetes node runs (init container, probes)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meshnet.cli import output
from meshnet.cni.protocol import DEFAULT_BIN_DIR, DEFAULT_CONF_DIR, DEFAULT_DAEMON_SOCKET


def _cmd_install_cni(args: argparse.Namespace) -> int:
    from meshnet import install

    try:
        if args.uninstall:
            install.uninstall(args.conf_dir, args.bin_dir)
            print(f"meshnet removed from {args.conf_dir} and {args.bin_dir}")
            return 0
        path = install.install(args.conf_dir, args.bin_dir, mode=args.mode, binary=args.binary,
                               socket=args.socket, log_file=args.log_file, wait=args.wait)
    except install.InstallError as e:
        return output.fail("install-cni", e)
    print(f"{path}: meshnet ({args.mode}) in front of {install.find_network_config(args.conf_dir).name}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from meshnet.daemon.api import health_check

    try:
        answer = health_check(args.socket)
    except OSError as e:
        return output.fail("health", f"{args.socket}: {e}")
    output.print_json(answer)
    return 0 if answer.get("ok") and (answer.get("ready") or not args.ready) else 1


def add_parsers(sub: Any) -> None:
    from meshnet import install

    p = sub.add_parser("install-cni", help="install meshnet's CNI binary and network config on this node")
    p.add_argument("--conf-dir", type=Path, default=Path(DEFAULT_CONF_DIR))
    p.add_argument("--bin-dir", type=Path, default=Path(DEFAULT_BIN_DIR))
    p.add_argument("--mode", choices=install.MODES, default="delegate",
                   help="delegate: the node's network runs as meshnet's delegate (default); chain: meshnet last")
    p.add_argument("--binary", type=Path, help="CNI binary: file, standalone build dir, or a link to its entry point")
    p.add_argument("--socket", default=DEFAULT_DAEMON_SOCKET)
    p.add_argument("--log-file")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the node's network config to appear")
    p.add_argument("--uninstall", action="store_true", help="remove meshnet's config and binary again")
    p.set_defaults(func=_cmd_install_cni)

    p = sub.add_parser("health", help="ask the node's meshnetd whether it is up (probes)")
    p.add_argument("--socket", default=DEFAULT_DAEMON_SOCKET)
    p.add_argument("--ready", action="store_true", help="also require the first reconciliation to be done")
    p.set_defaults(func=_cmd_health)
