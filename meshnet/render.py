"""The one Jinja environment: link plans → `ip` and `tc` commands (argv tuples, grouped by namespace).

Templates (`meshnet/templates/<kind>/<action>.j2`, package data) hold the whole link logic; this module
only feeds them
validated, frozen plans and turns their lines into `Command`s. Everything is rendered before
anything runs, so a template error never leaves a half-built link behind.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from meshnet import naming
from meshnet.command import Command
from meshnet.model import IPInterface, format_percent, format_rate, format_time
from meshnet.plan import ALL_CAPABILITIES, Capabilities, Endpoint, LinkPlan, MacvlanPlan, VethPlan, VxlanPlan

_UNSAFE = re.compile(r"['\"\\#;]")
HERE = "."  # the namespace the executor runs in (the node's)
ACTIONS = ("add", "del", "update")
KINDS = ("veth", "vxlan", "macvlan")
TOOLS = ("ip", "tc")


@lru_cache(maxsize=1)
def templates_dir() -> Path:
    """The link templates, shipped inside the package (package data in pyproject.toml), so a wheel
    installed anywhere finds them beside this module with no environment to set. Resolved once per
    process: `resolve()` stats every component of the path, 40 % of rendering one link when it
    ran on every `render` call (the ADD's, each peer update's, each reconcile's)."""
    return Path(__file__).resolve().parent / "templates"


class RenderError(Exception):
    """A template failed; names the template file and line."""


# Values never shape a command. A template is rendered with every text value that could shape a
# line (whitespace, control characters, quotes, `#`, `;`, brackets) replaced by a slot marker ("\0N\0":
# a character no template contains), so the lines and words of its output come from template text
# alone; each slot then gets its value back inside its word. Such a value therefore stays one
# argument (which the executor refuses) instead of becoming another command. A plain word is left
# as it is (templates compare some, e.g. `end.state == "down"`), and so are numbers and addresses
# (ipaddress objects, whose `.version` templates use; the model refuses scope ids, their only free
# text). Falsy values (None, "", 0) stay as they are: templates test them.
_SLOT = re.compile("\x00([0-9]+)\x00")
# What could shape a line or a word of the output (the executor refuses the same in an argument).
_SHAPES_TEXT = re.compile(r"[\s\x00-\x1f\x7f-\x9f'\"\\#;\[\]]")
_SLOT_FIELDS: dict[type, tuple[str, ...]] = {}


_SHAPES = _SHAPES_TEXT.search
# Types that hold no text (numbers, addresses, ...): learnt once per type, skipped without a call.
_NO_TEXT: set[type] = set()


def _slotted(value: Any, slots: list[str]) -> Any:
    if not value:
        return value
    t = type(value)
    if t is str:
        if not _SHAPES(value):
            return value  # one plain word: it cannot change a line (and templates may compare it)
        slots.append(value)
        return f"\x00{len(slots) - 1}\x00"
    if t is tuple or t is list:
        items = [_slotted(v, slots) for v in value]
        # Unchanged (the usual case: every value a plain word): the value itself, no copy.
        return value if all(a is b for a, b in zip(items, value, strict=True)) else t(items)
    names = _SLOT_FIELDS.get(t)
    if names is None:  # once per type: a plan or an endpoint has fields, a leaf value has none
        is_record = dataclasses.is_dataclass(value) and not isinstance(value, type)
        # `kind` chooses the template and is never a value in a line.
        names = _SLOT_FIELDS[t] = tuple(
            f.name for f in dataclasses.fields(value) if f.name != "kind") if is_record else ()
        if not names and not isinstance(value, (str, tuple, list)):
            _NO_TEXT.add(t)
    if not names:
        return value
    # Only the fields whose value changes are replaced (usually none: the plan itself is used).
    # Read from the instance's __dict__ (plans are frozen dataclasses without __slots__), and the
    # common leaves (a plain word, a number, an address) checked here without a call: the walk
    # is per rendered link.
    fields = getattr(value, "__dict__", None)
    changed: dict[str, Any] | None = None
    for n in names:
        v = fields[n] if fields is not None else getattr(value, n)
        if not v:
            continue
        tv = type(v)
        if tv in _NO_TEXT or (tv is str and not _SHAPES(v)):
            continue
        new = _slotted(v, slots)
        if new is not v:
            if changed is None:
                changed = {}
            changed[n] = new
    return value if changed is None else dataclasses.replace(value, **changed)


def _fill(word: str, slots: Sequence[str]) -> str:
    if "\x00" not in word:
        return word
    if word[0] == "\x00" and word[-1] == "\x00" and word.count("\x00") == 2:
        return slots[int(word[1:-1])]
    return _SLOT.sub(lambda m: slots[int(m.group(1))], word)


@lru_cache(maxsize=4)
def environment(root: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(root),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly, never renders ""
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        keep_trailing_newline=True,
        auto_reload=False,  # templates are read once per process: no stat() per rendered link
    )
    # Numbers back into tc's own spelling (20ms, 1%, 10mbit): what the user wrote, readable in `plan`.
    env.filters.update(tc_time=format_time, tc_percent=format_percent, tc_rate=format_rate)
    return env


def _parse(text: str, uid: int, where: str, slots: Sequence[str] = (), tool: str = "ip") -> list[Command]:
    """Template output (values as slots) → commands; lines and words come from template text only."""
    commands: list[Command] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("[") or "]" not in line:
            raise RenderError(f"{where}: output line {lineno} is not '[NETNS] ip-args': {_fill(line, slots)!r}")
        ns, _, rest = line[1:].partition("]")
        # No slots (every value a plain word, the usual case): no word can hold a marker.
        argv = tuple([w if "\x00" not in w else _fill(w, slots) for w in rest.split()] if slots else rest.split())
        if not argv or _UNSAFE.search(rest) or not ns or " " in ns:
            raise RenderError(f"{where}: output line {lineno} is unsafe or empty: {_fill(line, slots)!r}")
        if slots:
            ns = _fill(ns, slots)
        # Values are checked by the model before rendering and again by the executor before `ip`.
        commands.append(Command(None if ns == HERE else ns, argv, uid, where, tool))
    return commands


def _template(action: str, kind: str) -> tuple[jinja2.Template, str]:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    return _load(f"{kind}/{action}.j2")


def _load(name: str) -> tuple[jinja2.Template, str]:
    try:
        return environment(str(templates_dir())).get_template(name), name
    except jinja2.TemplateSyntaxError as e:
        raise RenderError(f"{e.filename or name}:{e.lineno}: {e.message}") from e
    except jinja2.TemplateError as e:
        raise RenderError(f"{name}: {e}") from e


def _render_one(template: jinja2.Template, name: str, plan: LinkPlan) -> list[Command]:
    slots: list[str] = []
    try:
        text = template.render(link=_slotted(plan, slots), node=_slotted(plan.node_netns or HERE, slots),
                               group=_slotted(naming.LINK_GROUP, slots))
    except jinja2.TemplateError as e:
        raise RenderError(f"{name}: {e}") from e
    return _parse(text, plan.uid, name, slots)


# --- links of one shape: rendered once, then filled in ------------------------------------------
# A lab's links mostly differ only in names, addresses and numbers that the templates print, or
# test only for being set (1500 veths of one pod pair: one shape; tests/test_render.py checks the
# templates keep to that). The first link of a shape is rendered with a
# mark in place of each such value ("\x01N\x01"; the template sees an address's `version` only),
# and that output, once checked equal to the link's own ordinary rendering, becomes the shape's
# recipe: the next links of the shape get their values filled into its words. Everything else
# (states, impairments, which values are empty, address families) is part of the shape, so a
# template that branches on it still gets a recipe per branch. A template that asks more of a mark
# than printing it makes no recipe (rendered link by link). Rendering 1500 veths: ~150 -> ~35 ms CPU.
_SUBSTITUTED = frozenset({"uid", "netns", "intf", "mac", "node_netns", "mtu", "vni", "remote_ip", "vtep_ip",
                          "uplink", "port", "parent"})
_ADDRESSES = frozenset({"ip", "ips"})
_MARK = re.compile("\x01([0-9]+)\x01")
# A recipe word: text as it is, the index of a value that is the whole word, or a word with marks
# inside (a list of text pieces and indexes, joined once filled).
_Word = str | int | list[str | int]
_Recipe = tuple[tuple[_Word | None, tuple[_Word, ...], str], ...]  # (netns, argv, tool)
_UNCACHEABLE: _Recipe = ()
# By the template object (another templates directory, e.g. a test's, has its own recipes).
_RECIPES: dict[tuple[jinja2.Template, Any], _Recipe] = {}
# Per plan type: its fields, each with how a shape treats it (see `_shape`).
_SUB, _ADDR, _OTHER = 0, 1, 2
_FIELDS: dict[type, tuple[tuple[str, int], ...]] = {}
_RECORDS: dict[type, bool] = {}


class _AddressMark:
    """An address in a shape's probe: prints as its mark; its family is part of the shape."""

    __slots__ = ("mark", "version")

    def __init__(self, mark: str, version: int) -> None:
        self.mark = mark
        self.version = version

    def __str__(self) -> str:
        return self.mark


def _is_record(t: type) -> bool:
    known = _RECORDS.get(t)
    if known is None:
        known = _RECORDS[t] = dataclasses.is_dataclass(t)
    return known


def _shape(value: Any, values: list[str]) -> tuple[Any, ...]:
    """The shape key of a plan or an endpoint; the values taken out are appended to `values` (in
    the order `_probe` gives their marks)."""
    t = type(value)
    fields = _FIELDS.get(t)
    if fields is None:
        fields = _FIELDS[t] = tuple((f.name, _SUB if f.name in _SUBSTITUTED else _ADDR if f.name in _ADDRESSES
                                     else _OTHER) for f in dataclasses.fields(value))
    own = value.__dict__
    key: list[Any] = [t]
    for n, how in fields:
        v = own[n]
        tv = type(v)
        if how == _SUB and v and (tv is str or tv is int):
            values.append(v if tv is str else str(v))
            key.append(tv)
        elif how == _ADDR and v:
            if tv is tuple:
                values.extend(map(str, v))
                key.append(tuple(a.version for a in v))
            else:
                values.append(str(v))
                key.append(v.version)
        elif n != "impairments" and _is_record(tv):
            key.append(_shape(v, values))
        else:
            key.append(v)  # by value: a template may test it
    return tuple(key)


def _probe(value: Any, count: list[int]) -> Any:
    """`value` with a mark ("\x01N\x01") in place of each value `_shape` took out."""
    changes: dict[str, Any] = {}
    own = value.__dict__
    for n, how in _FIELDS[type(value)]:
        v = own[n]
        tv = type(v)
        if how == _SUB and v and (tv is str or tv is int):
            changes[n] = f"\x01{count[0]}\x01"
            count[0] += 1
        elif how == _ADDR and v:
            marks = []
            for a in v if tv is tuple else (v,):
                marks.append(_AddressMark(f"\x01{count[0]}\x01", a.version))
                count[0] += 1
            changes[n] = tuple(marks) if tv is tuple else marks[0]
        elif n != "impairments" and _is_record(tv):
            changes[n] = _probe(v, count)
    probe = object.__new__(type(value))  # no __init__: a probe's marks are not valid values (need not be)
    probe.__dict__.update(own, **changes)
    return probe


def _word(text: str) -> _Word:
    if "\x01" not in text:
        return text
    pieces: list[str | int] = [int(p) if i % 2 else p for i, p in enumerate(_MARK.split(text))]
    pieces = [p for p in pieces if p != ""]
    return pieces[0] if len(pieces) == 1 and type(pieces[0]) is int else pieces


def _filled(word: _Word, values: Sequence[str]) -> str:
    if type(word) is str:
        return word
    if type(word) is int:
        return values[word]
    return "".join(p if type(p) is str else values[p] for p in word)  # type: ignore[union-attr, index]


def _from_recipe(recipe: _Recipe, values: Sequence[str], uid: int, name: str) -> list[Command]:
    return [Command(None if ns is None else _filled(ns, values), tuple([_filled(w, values) for w in argv]),
                    uid, name, tool) for ns, argv, tool in recipe]


def _render_shaped(template: jinja2.Template, name: str, plan: LinkPlan) -> list[Command]:
    """`_render_one`'s commands, from the recipe of the plan's shape when there is one."""
    values: list[str] = []
    try:
        key = _shape(plan, values)
        recipe = _RECIPES.get((template, key))
    except (TypeError, AttributeError):  # not a plain frozen dataclass (or an unhashable value)
        return _render_one(template, name, plan)
    if recipe:
        return _from_recipe(recipe, values, plan.uid, name)
    commands = _render_one(template, name, plan)
    if recipe is None:  # the shape's first link: try a recipe, kept only if it renders this link exactly
        try:
            made: _Recipe = tuple((None if c.netns is None else _word(c.netns), tuple(map(_word, c.argv)), c.tool)
                                  for c in _render_one(template, name, _probe(plan, [0])))
            ok = _from_recipe(made, values, plan.uid, name) == commands
        except Exception:  # a template that asks more of a mark than printing it: no recipe
            ok = False
        if len(_RECIPES) > 256:
            _RECIPES.clear()
        _RECIPES[(template, key)] = made if ok and made else _UNCACHEABLE
    return commands


def _render_text(name: str, uid: int, tool: str, **values: object) -> list[Command]:
    template, name = _load(name)
    slots: list[str] = []
    try:
        text = template.render(**{k: _slotted(v, slots) for k, v in values.items()})
    except jinja2.TemplateError as e:
        raise RenderError(f"{name}: {e}") from e
    return _parse(text, uid, name, slots, tool)


def render_impairments(end: Endpoint, uid: int, action: str,
                       caps: Capabilities = ALL_CAPABILITIES) -> list[Command]:
    """`tc` lines for one end: action "add" (new interface), "update" (replace in place) or
    "clear" (remove the tree). Nothing for an end without impairments, except "clear"."""
    if action not in ("add", "update", "clear"):
        raise ValueError(f"unknown tc action {action!r}")
    if action != "clear" and end.impairments is None:
        return []
    return _render_text(f"tc/{action}.j2", uid, "tc", end=end, caps=caps)


def render_end_change(end: Endpoint, uid: int, *, added: Sequence[IPInterface] = (),
                      removed: Sequence[IPInterface] = (), state: str = "") -> list[Command]:
    """`ip` lines that change a live end in place: addresses and administrative state."""
    return _render_text("end/change.j2", uid, "ip", end=end, added=list(added), removed=list(removed),
                        state=state)


def warm() -> None:
    """Compile every link template and render a made-up link of each kind once, output discarded.

    meshnetd calls this on a thread of its own once its first pass is done. The first rendering in a process
    compiles the templates and the macros they import, and takes Jinja's runtime through its
    first calls: 1500 veths took ~30-50 ms longer in a fresh daemon's first ADD than in the next.
    """
    from ipaddress import ip_interface

    a = Endpoint("mnw-a", "eth1", ip_interface("192.0.2.1/30"), "02:00:00:00:00:01")
    b = Endpoint("mnw-b", "eth1", ip_interface("192.0.2.2/30"), "02:00:00:00:00:02")
    made_up: list[LinkPlan] = [VethPlan(1, a, b, "mnw-node", 1500),
                               VxlanPlan(2, a, 4096, "192.0.2.5", "192.0.2.6", "eth0", None, 1450),
                               MacvlanPlan(3, a, "eth0", None, 1500)]
    for action in ACTIONS:
        render(made_up, action)


def render_link(plan: LinkPlan, action: str, caps: Capabilities = ALL_CAPABILITIES) -> list[Command]:
    return render([plan], action, caps)


def render(plans: Iterable[LinkPlan], action: str, caps: Capabilities = ALL_CAPABILITIES) -> list[Command]:
    """Every command of `action` for `plans`. On "add" and "update", ends with impairments get
    their `tc` lines too (what `caps` says this node can do; `meshnetctl plan` shows them all)."""
    commands: list[Command] = []
    templates: dict[str, tuple[jinja2.Template, str]] = {}
    for plan in plans:
        if plan.kind not in templates:
            templates[plan.kind] = _template(action, plan.kind)
        commands.extend(_render_shaped(*templates[plan.kind], plan))
        if action != "del":
            for end in plan.ends:
                commands.extend(render_impairments(end, plan.uid, action, caps))
    return commands
