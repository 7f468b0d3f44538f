"""One `ip` (or `tc`) command as an argv tuple, and how a list of them is grouped into batches.

Its own module so that the executor (and anything else that only runs or prints commands) does not
import the renderer and with it Jinja. Pure: standard library only.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Command:
    """One command: `ip -n netns ARGV...` (netns None: the executor's own namespace), or the same
    with `tc` for a link end's impairments."""

    netns: str | None
    argv: tuple[str, ...]
    uid: int = -1  # the link it belongs to, for journals and rollback
    # The template whose line this is ("" for the few commands code builds by hand: the executor
    # allows those only a closed set of verbs, see executor.check_command).
    template: str = field(default="", compare=False)
    tool: str = "ip"  # which batch runs it: `ip -batch` or `tc -batch`

    @property
    def creates(self) -> tuple[str | None, str] | None:
        """(namespace, interface) this command creates, if it is a `link add`."""
        if self.tool != "ip" or self.argv[:2] != ("link", "add"):
            return None
        head = self.argv[: self.argv.index("type")] if "type" in self.argv else self.argv
        where = head[head.index("netns") + 1] if "netns" in head else self.netns
        return where, self.argv[2]

    def shell(self) -> str:
        prefix = [self.tool] if self.netns is None else [self.tool, "-n", self.netns]
        return shlex.join([*prefix, *self.argv])


def _phase(c: Command) -> int:
    verb = c.argv[:2]
    if c.tool == "ip" and verb == ("link", "del"):
        return 0
    return 1 if c.tool == "ip" and verb == ("link", "add") else 2


def phases(commands: Sequence[Command]) -> list[list[tuple[str | None, list[Command]]]]:
    """Group commands into batches: deletions, then creations, then the rest (addresses, up, and
    the `tc` lines of impairments). One batch per namespace and tool in each phase.

    Creations run in the node's namespace before addressing runs in the pods, and an update's
    deletion before its re-creation, whatever order the links came in; inside a batch the
    template order is kept. A pod's `tc` batch runs beside its `ip` batch, not after it: a qdisc
    needs the interface to exist, not to be up, so impairments add no phase (no wait) to an ADD.
    """
    out: list[list[tuple[str | None, list[Command]]]] = []
    for phase in (0, 1, 2):
        groups: dict[tuple[str | None, str], list[Command]] = {}
        for c in commands:
            if _phase(c) == phase:
                groups.setdefault((c.netns, c.tool), []).append(c)
        if groups:
            out.append([(ns, batch) for (ns, _), batch in groups.items()])
    return out


def script(commands: Sequence[Command], *, header: str = "") -> str:
    """A replayable shell script: one `ip -batch` (or `tc -batch`) here-document per namespace and phase."""
    lines = ["#!/bin/sh", "set -e"]
    if header:
        lines.extend(f"# {h}" if h else "#" for h in header.splitlines())
    for phase in phases(commands):
        for ns, batch in phase:
            tool = batch[0].tool
            prefix = f"{tool} -batch -" if ns is None else f"{tool} -n {ns} -batch -"
            if tool == "tc":
                # The replaying machine may lack netem (the daemon asks its kernel; a script cannot
                # know in advance): go on past a refused qdisc, as the daemon would, and say so.
                lines.append(f"{tool} {'' if ns is None else f'-n {ns} '}-force -batch - <<'EOF' || "
                             f"echo 'meshnet: some impairments are unavailable here (netem?)' >&2")
            else:
                lines.append(f"{prefix} <<'EOF'")
            lines.extend(" ".join(c.argv) for c in batch)
            lines.append("EOF")
    return "\n".join(lines) + "\n"
