"""The one Jinja environment: link plans → `ip` commands (argv tuples, grouped by namespace).

Templates (`meshnet/templates/<kind>/<action>.j2`, package data) hold the whole link logic; this module only feeds them
validated, frozen plans and turns their lines into `Command`s. Everything is rendered before
anything runs, so a template error never leaves a half-built link behind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import jinja2

from meshnet import naming
from meshnet.command import Command
from meshnet.plan import LinkPlan

_UNSAFE = re.compile(r"['\"\\#;]")
HERE = "."  # the namespace the executor runs in (the node's)
ACTIONS = ("add", "del", "update")
KINDS = ("veth", "vxlan", "macvlan")


def templates_dir() -> Path:
    """The link templates, shipped inside the package (package data in pyproject.toml), so a wheel
    installed anywhere finds them beside this module with no environment to set."""
    return Path(__file__).resolve().parent / "templates"


class RenderError(Exception):
    """A template failed; names the template file and line."""


@lru_cache(maxsize=4)
def environment(root: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly, never renders ""
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        keep_trailing_newline=True,
        auto_reload=False,  # templates are read once per process: no stat() per rendered link
    )


def _parse(text: str, uid: int, where: str) -> list[Command]:
    commands: list[Command] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("[") or "]" not in line:
            raise RenderError(f"{where}: output line {lineno} is not '[NETNS] ip-args': {line!r}")
        ns, _, rest = line[1:].partition("]")
        # Values are validated before rendering (no whitespace or quotes in names, addresses via
        # ipaddress), so a plain split is exact; the checks below keep it so.
        argv = tuple(rest.split())
        if not argv or _UNSAFE.search(rest) or not ns or " " in ns:
            raise RenderError(f"{where}: output line {lineno} is unsafe or empty: {line!r}")
        commands.append(Command(None if ns == HERE else ns, argv, uid))
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
    try:
        text = template.render(link=plan, node=plan.node_netns or HERE, group=naming.LINK_GROUP)
    except jinja2.TemplateError as e:
        raise RenderError(f"{name}: {e}") from e
    return _parse(text, plan.uid, name)


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
