"""How meshnetctl prints, for every command group: errors and progress on stderr, tables and JSON
on stdout, and the program name as the user typed it for hints."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Any


def fail(cmd: str, e: BaseException | str) -> int:
    """`meshnetctl CMD: message` on stderr; the exit code of a failed command."""
    print(f"meshnetctl {cmd}: {e}", file=sys.stderr)
    return 1


def to_stderr(msg: str) -> None:
    """A line for the user that is not the command's output: progress, warnings, hints."""
    print(msg, file=sys.stderr, flush=True)


def problems(head: str, found: Iterable[str]) -> None:
    """What is wrong with a file: a head line, then one indented line per problem, on stderr."""
    print(head, file=sys.stderr)
    for p in found:
        print(f"  {p}", file=sys.stderr)


def table(rows: list[list[str]], head: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    for row in [head, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def print_json(value: Any, indent: int | None = None) -> None:
    print(json.dumps(value, indent=indent))


def prog() -> str:
    """How the user ran us, so printed hints work as typed (e.g. .venv/bin/meshnetctl)."""
    argv0 = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == "meshnetctl" else "meshnetctl"
    if os.sep not in argv0:
        return argv0
    rel = os.path.relpath(argv0)
    return rel if not rel.startswith("..") else argv0
