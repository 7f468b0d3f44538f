"""The one Jinja environment: link plans → `ip` commands (argv tuples, grouped by namespace).

Templates (`templates/<kind>/<action>.j2`) hold the whole link logic; this module only feeds them
validated, frozen plans and turns their lines into `Command`s. Everything is rendered before
anything runs, so a template error never leaves a half-built link behind.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jinja2
from markupsafe import Markup

from meshnet import naming
from meshnet.plan import LinkPlan

_UNSAFE = re.compile(r"['\"\\#;]")
HERE = "."  # the namespace the executor runs in (the node's)
ACTIONS = ("add", "del", "update")
KINDS = ("veth", "vxlan", "macvlan")


def templates_dir() -> Path:
    override = os.environ.get("MESHNET_TEMPLATES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "templates"


class RenderError(Exception):
    """A template failed; names the template file and line."""


@dataclass(frozen=True)
class Command:
    """One `ip` command: `ip -n netns ARGV...` (netns None: the executor's own namespace)."""

    netns: str | None
    argv: tuple[str, ...]
    uid: int = -1  # the link it belongs to, for journals and rollback
    # The template whose line this is ("" for the few commands code builds by hand: the executor
    # allows those only a closed set of verbs, see executor.check_command).
    template: str = field(default="", compare=False)

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


# Values never shape a command. Each `{{ value }}` renders as a slot marker ("\0N\0", a character
# no template contains) and the value is kept aside; lines and words are cut from the template's
# own text, then each slot gets its value back inside its word. A value carrying a line break or a
# space therefore stays one argument (which the executor refuses) instead of becoming another
# command. Macro output is already made of template text and slots, and comes back as Markup
# (autoescape on, so that the two can be told apart): it passes through untouched.
_SLOT = re.compile("\x00([0-9]+)\x00")
_slots: ContextVar[list[str] | None] = ContextVar("meshnet_render_slots", default=None)


def _finalize(value: object) -> object:
    if isinstance(value, Markup):
        return value
    slots = _slots.get()
    if slots is None:  # a constant folded while compiling: template text itself
        return value
    slots.append(str(value))
    return Markup(f"\x00{len(slots) - 1}\x00")


def _fill(word: str, slots: Sequence[str]) -> str:
    return _SLOT.sub(lambda m: slots[int(m.group(1))], word) if "\x00" in word else word


@lru_cache(maxsize=4)
def environment(root: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly, never renders ""
        trim_blocks=True,
        lstrip_blocks=True,
        # Not HTML: it only marks macro output as template-made (see _finalize); literal template
        # text is never escaped, and every value is replaced by a slot before escaping could apply.
        autoescape=True,
        finalize=_finalize,
        keep_trailing_newline=True,
        auto_reload=False,  # templates are read once per process: no stat() per rendered link
    )


def _parse(text: str, uid: int, where: str, slots: Sequence[str] = ()) -> list[Command]:
    """Template output (values as slots) → commands; lines and words come from template text only."""
    commands: list[Command] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("[") or "]" not in line:
            raise RenderError(f"{where}: output line {lineno} is not '[NETNS] ip-args': {_fill(line, slots)!r}")
        ns, _, rest = line[1:].partition("]")
        argv = tuple(_fill(word, slots) for word in rest.split())
        if not argv or _UNSAFE.search(rest) or not ns or " " in ns:
            raise RenderError(f"{where}: output line {lineno} is unsafe or empty: {_fill(line, slots)!r}")
        ns = _fill(ns, slots)
        # Values are checked by the model before rendering and again by the executor before `ip`.
        commands.append(Command(None if ns == HERE else ns, argv, uid, where))
    return commands


def _template(action: str, kind: str) -> tuple[jinja2.Template, str]:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    name = f"{kind}/{action}.j2"
    try:
        return environment(str(templates_dir())).get_template(name), name
    except jinja2.TemplateSyntaxError as e:
        raise RenderError(f"{e.filename or name}:{e.lineno}: {e.message}") from e
    except jinja2.TemplateError as e:
        raise RenderError(f"{name}: {e}") from e


def _render_one(template: jinja2.Template, name: str, plan: LinkPlan) -> list[Command]:
    slots: list[str] = []
    token = _slots.set(slots)
    try:
        text = template.render(link=plan, node=plan.node_netns or HERE, group=naming.LINK_GROUP)
    except jinja2.TemplateError as e:
        raise RenderError(f"{name}: {e}") from e
    finally:
        _slots.reset(token)
    return _parse(text, plan.uid, name, slots)


def render_link(plan: LinkPlan, action: str) -> list[Command]:
    return _render_one(*_template(action, plan.kind), plan)


def render(plans: Iterable[LinkPlan], action: str) -> list[Command]:
    commands: list[Command] = []
    templates: dict[str, tuple[jinja2.Template, str]] = {}
    for plan in plans:
        if plan.kind not in templates:
            templates[plan.kind] = _template(action, plan.kind)
        commands.extend(_render_one(*templates[plan.kind], plan))
    return commands


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
