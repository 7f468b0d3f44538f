"""The executor's last line of defence: no value, however it got past the model, changes what `ip`
runs. Every parameter of every template is set to a hostile value (bypassing the model's
validation, as a forged status would have to) and the executor must refuse the rendered commands
before any `ip` process starts. pytest-subprocess (`fp`) is active with no `ip` registered: a
process that did start would fail the test with ProcessNotRegisteredError, and `fp.calls` is
checked empty besides. A canary shows that the same set-up lets a good command through.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from pytest_subprocess import FakeProcess

from meshnet import render
from meshnet.command import Command
from meshnet.executor import Executor, UnsafeCommand, check_command
from meshnet.plan import Endpoint, LinkPlan, MacvlanPlan, VethPlan, VxlanPlan
from meshnet.render import render_link

VETH = VethPlan(7, Endpoint("mnt-pa", "eth1", ipaddress.ip_interface("10.0.0.1/30"), "02:00:00:00:00:01"),
                Endpoint("mnt-pb", "eth2", ipaddress.ip_interface("10.0.0.2/30"), "02:00:00:00:00:02"),
                "mnt-node", 1500)
VXLAN = VxlanPlan(8, Endpoint("mnt-pa", "eth3", ipaddress.ip_interface("2001:db8::1/64"), "02:00:00:00:00:03"),
                  4096 * 3 + 8, "198.51.100.2", "198.51.100.1", "eth0", "mnt-node", 1450)
MACVLAN = MacvlanPlan(9, Endpoint("mnt-pa", "eth4", ipaddress.ip_interface("10.0.1.1/24"), "02:00:00:00:00:04"),
                      "eth9", "mnt-node", 1400)
PLANS: dict[str, LinkPlan] = {"veth": VETH, "vxlan": VXLAN, "macvlan": MACVLAN}

CANARY = "/tmp/mnt-canary-never"
HOSTILE = [
    f"x\n[.] netns exec mnt-node touch {CANARY}",  # the injection: a new `ip -batch` line
    "eth1 down",  # a space: one more word on the same line
    "a\tb",
    "a\rb",
    "a\x1b[2Jb",  # a control character (terminal escape)
    "a\x00b",
    "-force",  # an option
    "a#b",  # an `ip -batch` comment
    "a'b",
    "a\\b",
]  # (an empty value means "none" to the optional ones: see the hand-built test for empty arguments)


def _params(plan: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every text value a template can use (endpoints expanded)."""
    out: list[str] = []
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if f.name in ("kind", "state"):
            continue  # they choose the template or its words (up/down); never rendered as given
        if isinstance(value, Endpoint):
            out += _params(value, f"{prefix}{f.name}.")
        elif isinstance(value, str) or (value is None and "str" in str(f.type)):
            # Text is what a forged value can carry; numbers and addresses are typed (the model
            # builds them through int() and ipaddress), and templates use them as such (`.version`).
            out.append(f"{prefix}{f.name}")
    return out


def _with(plan: Any, path: str, value: object) -> Any:
    head, _, rest = path.partition(".")
    if rest:
        return dataclasses.replace(plan, **{head: _with(getattr(plan, head), rest, value)})
    return dataclasses.replace(plan, **{head: value})


PROBE = "zzprobe"


def _uses(plan: LinkPlan, action: str, path: str) -> bool:
    """Whether the template renders `path` (a probe value set there shows up in a command)."""
    probed = render_link(_with(plan, path, PROBE), action)
    return any(PROBE in (c.netns or "") or any(PROBE in a for a in c.argv) for c in probed)


CASES = [(kind, action, path) for kind, plan in PLANS.items() for action in render.ACTIONS
         for path in _params(plan)]
USED = [c for c in CASES if _uses(PLANS[c[0]], c[1], c[2])]


def test_every_template_uses_parameters_and_all_are_covered() -> None:
    """The coverage below is not vacuous: each template renders values, and every value a plan
    carries (but uid, which names the link for journals) reaches at least one template."""
    for kind in PLANS:
        for action in render.ACTIONS:
            assert any(c[:2] == (kind, action) for c in USED), f"{kind}/{action}.j2 uses no parameter?"
    used_paths = {(c[0], c[2]) for c in USED}
    for kind, plan in PLANS.items():
        missing = {p for p in _params(plan) if (kind, p) not in used_paths} - {"uid"}
        assert not missing, f"{kind}: parameters no template renders: {missing}"


def _run(executor: Executor, action: str, commands: list[Command]) -> None:
    if action == "del":
        executor.run_best_effort(commands)
    else:
        executor.apply(commands)


@pytest.mark.parametrize(("kind", "action", "path"), USED, ids=[f"{k}-{a}-{p}" for k, a, p in USED])
def test_a_hostile_value_in_any_parameter_is_refused_before_ip_runs(fp: FakeProcess, kind: str, action: str,
                                                                    path: str) -> None:
    good = render_link(PLANS[kind], action)
    for value in HOSTILE:
        commands = render_link(_with(PLANS[kind], path, value), action)
        # The value shapes no command: same lines, same words; it sits inside one argument.
        assert [len(c.argv) for c in commands] == [len(c.argv) for c in good], (path, value)
        with pytest.raises(UnsafeCommand) as err:
            _run(Executor(), action, commands)
        assert repr(value)[1:-1][:40] in str(err.value), f"the error does not name {value!r}: {err.value}"
    assert not fp.calls  # nothing ran (and an unregistered `ip` would have raised)


@pytest.mark.parametrize("kind", sorted(PLANS))
def test_canary_good_commands_pass_the_same_executor(fp: FakeProcess, kind: str) -> None:
    fp.register([fp.program("ip"), fp.any()], occurrences=20)
    commands = render_link(PLANS[kind], "add")
    assert all(c.template == f"{kind}/add.j2" for c in commands)
    Executor().apply(commands)
    assert len(fp.calls) >= 1


@pytest.mark.parametrize("command", [
    Command(None, ("link", "add", "eth1", "type", "dummy")),  # creating is a template's job only
    Command(None, ("netns", "exec", "mnt-x", "touch", CANARY)),
    Command("mnt-x", ("link", "add", "eth1", "netns", "mnt-y", "type", "veth", "peer", "name", "eth2")),
])
def test_a_command_not_from_a_template_is_refused(fp: FakeProcess, command: Command) -> None:
    with pytest.raises(UnsafeCommand, match="does not come from a template"):
        Executor().apply([command])
    with pytest.raises(UnsafeCommand, match="does not come from a template"):
        Executor(dry_run=True).run_best_effort([command])
    assert not fp.calls


def test_hand_built_removals_and_lab_set_up_still_pass() -> None:
    for command in (Command("mnt-a", ("link", "del", "eth1")), Command("mnt-a", ("link", "del", "group", "28014")),
                    Command(None, ("netns", "add", "mnl-demo-r1")), Command("mnl-demo-r1", ("link", "set", "lo", "up")),
                    Command("mnl-demo-r1", ("addr", "replace", "10.0.0.1/32", "dev", "lo")),
                    Command("mnl-demo-r1", ("route", "replace", "10.0.0.0/24", "via", "10.0.1.2", "dev", "eth1"))):
        check_command(command)


def test_lab_set_up_may_build_links_by_hand_but_its_arguments_are_checked(fp: FakeProcess) -> None:
    with pytest.raises(UnsafeCommand, match="'br0 x'"):
        Executor().run_sequence([Command("mnl-x-ul", ("link", "add", "br0 x", "type", "bridge"))])
    assert not fp.calls
    check_command(Command("mnl-x-ul", ("link", "add", "br0", "type", "bridge")), set_up=True)


def test_a_hostile_hand_built_argument_is_refused_naming_it(fp: FakeProcess) -> None:
    with pytest.raises(UnsafeCommand, match=r"'eth1\\n"):
        Executor().run_best_effort([Command("mnt-a", ("link", "del", "eth1\nnetns exec x touch y"))])
    with pytest.raises(UnsafeCommand, match="is empty"):
        Executor().run_best_effort([Command("mnt-a", ("link", "del", ""))])
    with pytest.raises(UnsafeCommand, match="namespace 'mnt a'"):
        Executor().run_best_effort([Command("mnt a", ("link", "del", "eth1"))])
    assert not fp.calls


def test_a_batch_is_refused_whole_before_its_first_command_runs(fp: FakeProcess) -> None:
    good = render_link(VETH, "add")
    bad = render_link(_with(VXLAN, "remote_ip", "198.51.100.2\n[.] link del eth0"), "add")
    with pytest.raises(UnsafeCommand):
        Executor().apply([*good, *bad])
    assert not fp.calls


@pytest.mark.parametrize("value", ["", "-x", "-", "a b", "a\tb", "a\nb", "x#", "a'b", 'a"b', "a\\b", "a;b", "\x85",
                                   "\x00", "a-b", "ok", "é", "eth0", "10.0.0.1/30", 5, b"x", None])
def test_the_whole_command_check_refuses_what_the_word_check_refuses(value: object) -> None:
    """Commands are checked a batch (and a line) at a time first (the usual line is plain words);
    whatever that lets through, the word-by-word check (which names the value) would too."""
    from meshnet.executor import _value_problem, check_commands
    bad = _value_problem(value) is not None
    for argv, netns in (((value, "set", "eth1", "up"), "pa"), (("link", "set", "eth1", value), None),
                        (("link", "set", "eth1", "up"), value)):
        command = Command(netns, argv, template="veth/add.j2")  # type: ignore[arg-type]
        if netns is None and value is None:
            continue
        fine = Command("pb", ("link", "set", "eth2", "up"), template="veth/add.j2")
        for batch in ([command], [fine, command, fine]):
            if bad:
                with pytest.raises(UnsafeCommand):
                    check_command(command) if len(batch) == 1 else check_commands(batch)
            else:
                check_command(command) if len(batch) == 1 else check_commands(batch)
