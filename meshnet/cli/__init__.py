"""meshnetctl: one module per command group, each registering its commands with `add_parsers(sub)`;
all of them print through `output`.

    plan.py        validate, plan (the dry run)
    lab.py         lab up|apply|down|status|exec|ping|pod restart|daemon restart
    topo.py        topo build|routes|graph|create|destroy, init-wait
    node.py        install-cni, health
    standalone.py  topology apply|delete, podman-network
    link.py        link set POD:INTF down|up, impairments (lab, standalone store, cluster)
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

DESCRIPTION = "meshnetctl: dry-run plans, validation, the emulated lab, topology tools, node installation."


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top, so that the package itself imports none of its modules: they
    # import `meshnet.cli.output`, which would otherwise be an import cycle through this file.
    from meshnet.cli import lab, link, node, plan, standalone, topo

    parser = argparse.ArgumentParser(prog="meshnetctl", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (plan, lab, topo, node, standalone, link):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def run() -> None:
    """The `meshnetctl` program. `meshnetctl ... | head` ends quietly, as other command-line tools
    do; only the program does this, never `main()` called from other Python code (a test runner
    killed by SIGPIPE would be no improvement)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
