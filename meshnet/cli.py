"""meshnetctl: dry-run plans, validation, the emulated lab, topology tools, node installation."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshnet.model import ManifestError, load_manifest


def _cmd_validate(args: argparse.Namespace) -> int:
    ok = True
    for path in args.files:
        try:
            m = load_manifest(path)
        except ManifestError as e:
            ok = False
            print(f"{path}: invalid", file=sys.stderr)
            for p in e.problems:
                print(f"  {p}", file=sys.stderr)
            continue
        links = sum(len(t.links) for t in m.topologies)
        print(f"{path}: ok ({len(m.topologies)} topologies, {len(m.pods)} pods, {links} link ends)")
    return 0 if ok else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from meshnet.dryrun import PlanError, layout_for, setup_script, teardown_script

    try:
        lab = layout_for(load_manifest(args.file), args.nodes, args.prefix)
    except (ManifestError, PlanError) as e:
        print(f"meshnetctl plan: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(teardown_script(lab) if args.delete else setup_script(lab))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnetctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check Topology manifests; every problem named by object, uid and field")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="dry run: print the ip commands of a lab as a replayable shell script")
    p.add_argument("file")
    p.add_argument("--nodes", type=int, default=1, help="emulated nodes (pods round-robin); default 1")
    p.add_argument("--prefix", default="mnd-", help="namespace name prefix; default mnd-")
    p.add_argument("--delete", action="store_true", help="print the teardown instead")
    p.set_defaults(func=_cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
