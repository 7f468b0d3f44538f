"""Regenerate tests/golden/: the `ip` commands the templates render for every test manifest.

    python -m tests.golden_gen        (what `make golden` runs; review the result with `git diff`)

One file per manifest × emulated node count × action: `tests/golden/<manifest>-n<N>-<action>.txt`,
one `Command.shell()` line per command, in render order. `tests/test_render.py` compares them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from meshnet.dryrun import every_link_plan, layout_for, simulate_adds
from meshnet.model import load_manifest
from meshnet.render import ACTIONS, render

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden"
NODE_COUNTS = (1, 3)
PREFIX = "mnd-"  # the default prefix of `meshnetctl plan`


def manifests() -> list[Path]:
    return sorted(TESTS.glob("*.yml"))


def golden_name(manifest: Path, nodes: int, action: str) -> str:
    return f"{manifest.stem}-n{nodes}-{action}.txt"


def golden_text(manifest: Path, nodes: int, action: str) -> str:
    lab = layout_for(load_manifest(manifest), nodes, PREFIX)
    plans = every_link_plan(simulate_adds(lab.manifest, lab.layout))
    return "".join(c.shell() + "\n" for c in render(plans, action))


def expected_files() -> dict[str, str]:
    return {golden_name(m, n, a): golden_text(m, n, a) for m in manifests() for n in NODE_COUNTS for a in ACTIONS}


def main() -> int:
    GOLDEN.mkdir(exist_ok=True)
    wanted = expected_files()
    for stale in sorted(set(p.name for p in GOLDEN.glob("*.txt")) - set(wanted)):
        (GOLDEN / stale).unlink()
        print(f"removed {stale}")
    changed = 0
    for name, text in sorted(wanted.items()):
        path = GOLDEN / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed += 1
            print(f"wrote {name}")
    print(f"{len(wanted)} golden files, {changed} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
