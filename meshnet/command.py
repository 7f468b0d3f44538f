"""One `ip` command as an argv tuple, and how a list of them is grouped into `ip -batch` runs.

Its own module so that the executor (and anything else that only runs or prints commands) does not
import the renderer and with it Jinja. Pure: standard library only.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One `ip` command: `ip -n netns ARGV...` (netns None: the executor's own namespace)."""

    netns: str | None
    argv: tuple[str, ...]
    uid: int = -1  # the link it belongs to, for journals and rollback

    @property
    def creates(self) -> tuple[str | None, str] | None:
        """(namespace, interface) this command creates, if it is a `link add`."""
        if self.argv[:2] != ("link", "add"):
            return None
        head = self.argv[: self.argv.index("type")] if "type" in self.argv else self.argv
        where = head[head.index("netns") + 1] if "netns" in head else self.netns
        return where, self.argv[2]

    def shell(self) -> str:
        prefix = ["ip"] if self.netns is None else ["ip", "-n", self.netns]
        return shlex.join([*prefix, *self.argv])


def _phase(c: Command) -> int:
    verb = c.argv[:2]
    return 0 if verb == ("link", "del") else 1 if verb == ("link", "add") else 2


def phases(commands: Sequence[Command]) -> list[list[tuple[str | None, list[Command]]]]:
    """Group commands into batches: deletions, then creations, then the rest (addresses, up).

    One batch per namespace in each phase. Creations run in the node's namespace before
    addressing runs in the pods, and an update's deletion before its re-creation, whatever order
    the links came in; inside a batch the template order is kept.
    """
    out: list[list[tuple[str | None, list[Command]]]] = []
    for phase in (0, 1, 2):
        groups: dict[str | None, list[Command]] = {}
        for c in commands:
            if _phase(c) == phase:
                groups.setdefault(c.netns, []).append(c)
        if groups:
            out.append(list(groups.items()))
    return out


def script(commands: Sequence[Command], *, header: str = "") -> str:
    """A replayable shell script: one `ip -batch` here-document per namespace and phase."""
    lines = ["#!/bin/sh", "set -e"]
    if header:
        lines.extend(f"# {h}" if h else "#" for h in header.splitlines())
    for phase in phases(commands):
        for ns, batch in phase:
            prefix = "ip -batch -" if ns is None else f"ip -n {ns} -batch -"
            lines.append(f"{prefix} <<'EOF'")
            lines.extend(" ".join(c.argv) for c in batch)
            lines.append("EOF")
    return "\n".join(lines) + "\n"
