"""`meshnetctl validate` and `meshnetctl plan`: read manifests, touch nothing (no root needed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from meshnet.cli import output
from meshnet.model import ManifestError, load_manifest


def _cmd_validate(args: argparse.Namespace) -> int:
    ok = True
    for path in args.files:
        try:
            m = load_manifest(path)
        except ManifestError as e:
            ok = False
            output.problems(f"{path}: invalid", e.problems)
            continue
        from meshnet.topo.routes import loopback_problems

        bad = loopback_problems(Path(path).read_text(), path)
        if bad:
            ok = False
            output.problems(f"{path}: invalid", bad)
            continue
        links = sum(len(t.links) for t in m.topologies)
        print(f"{path}: ok ({len(m.topologies)} topologies, {len(m.pods)} pods, {links} link ends)")
    return 0 if ok else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from meshnet.dryrun import PlanError, layout_for, setup_script, teardown_script
    from meshnet.render import RenderError

    try:
        lab = layout_for(load_manifest(args.file), args.nodes, args.prefix)
        text = teardown_script(lab) if args.delete else setup_script(lab)
    except (ManifestError, PlanError, RenderError) as e:
        return output.fail("plan", e)
    sys.stdout.write(text)
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("validate", help="check Topology manifests; every problem named by object, uid and field")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="dry run: print the ip commands of a lab as a replayable shell script")
    p.add_argument("file")
    p.add_argument("--nodes", type=int, default=1, help="emulated nodes (pods round-robin); default 1")
    p.add_argument("--prefix", default="mnd-", help="namespace name prefix; default mnd-")
    p.add_argument("--delete", action="store_true", help="print the teardown instead")
    p.set_defaults(func=_cmd_plan)
