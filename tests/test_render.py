"""Templates → `ip` commands: golden files, strictness, refusal of unsafe output, phases."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnet import naming, render
from meshnet.command import Command, phases, script
from meshnet.plan import Endpoint, MacvlanPlan, VethPlan, VxlanPlan
from meshnet.render import RenderError, render_link
from tests import golden_gen

VETH = VethPlan(7, Endpoint("pa", "eth1", ipaddress.ip_interface("10.0.0.1/30")),
                Endpoint("pb", "eth2", ipaddress.ip_interface("10.0.0.2/30")), "node", 1500)
VXLAN = VxlanPlan(8, Endpoint("pa", "eth3", ipaddress.ip_interface("2001:db8::1/64")), 4096 * 3 + 8,
                  "198.51.100.2", "198.51.100.1", "eth0", None, 1450)
MACVLAN = MacvlanPlan(9, Endpoint("pa", "eth4", None), "eth0", "node", None)


CASES = [(m, n, a) for m in golden_gen.manifests() for n in golden_gen.NODE_COUNTS for a in render.ACTIONS]


@pytest.mark.parametrize(("manifest", "nodes", "action"), CASES,
                         ids=[golden_gen.golden_name(*c) for c in CASES])
def test_golden_file_matches_rendering(manifest: Path, nodes: int, action: str) -> None:
    name = golden_gen.golden_name(manifest, nodes, action)
    path = golden_gen.GOLDEN / name
    assert path.exists(), f"{name} missing: run `python -m tests.golden_gen` (make golden)"
    want = golden_gen.golden_text(manifest, nodes, action)
    assert want.strip(), f"{name}: rendering produced no commands"
    assert path.read_text() == want, f"{name} differs: run make golden and review git diff"


def test_no_stale_golden_files() -> None:
    wanted = {golden_gen.golden_name(*c) for c in CASES}
    assert {p.name for p in golden_gen.GOLDEN.glob("*.txt")} == wanted
    assert len(wanted) == len(golden_gen.manifests()) * 2 * 3
    assert "3node-mlink-n3-update.txt" in wanted and "macvlan-n1-del.txt" in wanted


def test_golden_regeneration_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    assert golden_gen.main() == 0
    assert "0 changed" in capsys.readouterr().out


def test_veth_add_renders_exact_commands() -> None:
    lines = [c.shell() for c in render_link(VETH, "add")]
    assert lines == [
        "ip -n node link add eth1 mtu 1500 group 28014 netns pa type veth peer name eth2 mtu 1500 group 28014 netns pb",
        "ip -n pa addr add 10.0.0.1/30 dev eth1",
        "ip -n pa link set eth1 up",
        "ip -n pb addr add 10.0.0.2/30 dev eth2",
        "ip -n pb link set eth2 up",
    ]
    assert all(c.uid == 7 for c in render_link(VETH, "add"))


def test_vxlan_add_runs_in_executor_namespace_when_node_netns_is_none() -> None:
    cmds = render_link(VXLAN, "add")
    assert cmds[0].netns is None
    assert cmds[0].argv == ("link", "add", "eth3", "mtu", "1450", "group", "28014", "netns", "pa", "type", "vxlan",
                            "id",
                            str(4096 * 3 + 8), "remote", "198.51.100.2", "local", "198.51.100.1",
                            "dstport", "4789", "dev", "eth0")
    assert cmds[1].shell() == "ip -n pa addr add 2001:db8::1/64 dev eth3 nodad"  # usable at once, no DAD


def test_macvlan_without_address_only_brings_link_up() -> None:
    assert [c.shell() for c in render_link(MACVLAN, "add")] == [
        "ip -n node link add eth4 group 28014 link eth0 netns pa type macvlan mode bridge",
        "ip -n pa link set eth4 up",
    ]


def test_stable_macs_and_the_link_group_reach_ip() -> None:
    """Each end gets the MAC the plan computed (stable per pod and interface) and meshnet's group."""
    mac_a, mac_b = naming.mac_address("default", "a", "eth1"), naming.mac_address("default", "b", "eth2")
    veth = VethPlan(7, Endpoint("pa", "eth1", None, mac_a), Endpoint("pb", "eth2", None, mac_b), "node", 1500)
    assert render_link(veth, "add")[0].argv == (
        "link", "add", "eth1", "address", mac_a, "mtu", "1500", "group", str(naming.LINK_GROUP), "netns", "pa",
        "type", "veth", "peer", "name", "eth2", "address", mac_b, "mtu", "1500", "group", str(naming.LINK_GROUP),
        "netns", "pb")
    assert mac_a == naming.mac_address("default", "a", "eth1") != mac_b
    assert int(mac_a.split(":")[0], 16) & 0x03 == 0x02  # locally administered, unicast


def test_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown action"):
        render_link(VETH, "replace")


def test_creates_names_the_namespace_the_interface_is_born_in() -> None:
    add = render_link(VETH, "add")
    assert add[0].creates == ("pa", "eth1")
    assert add[1].creates is None
    assert Command(None, ("link", "add", "dummy0", "type", "dummy")).creates == (None, "dummy0")


def test_phases_put_creations_first_one_batch_per_namespace() -> None:
    cmds = [*render_link(VETH, "add"), *render_link(VXLAN, "add"), *render_link(MACVLAN, "add")]
    out = phases(cmds)
    assert len(out) == 2
    creations, rest = out
    assert [ns for ns, _ in creations] == ["node", None]
    assert all(c.argv[:2] == ("link", "add") for _, batch in creations for c in batch)
    assert [c.argv[2] for c in dict(creations)["node"]] == ["eth1", "eth4"]  # template order kept
    assert [ns for ns, _ in rest] == ["pa", "pb"]
    assert not any(c.argv[:2] == ("link", "add") for _, batch in rest for c in batch)
    assert [" ".join(c.argv) for c in dict(rest)["pa"]] == [
        "addr add 10.0.0.1/30 dev eth1", "link set eth1 up", "addr add 2001:db8::1/64 dev eth3 nodad",
        "link set eth3 up", "link set eth4 up"]


def test_phases_of_deletions_only_have_one_phase() -> None:
    assert [[ns for ns, _ in p] for p in phases(render_link(VETH, "del"))] == [["pa"]]


def test_script_is_one_heredoc_per_namespace_and_phase() -> None:
    text = script(render_link(VETH, "add"), header="hello")
    assert text.startswith("#!/bin/sh\nset -e\n# hello\n")
    assert text.count("-batch - <<'EOF'") == 3
    assert "ip -n node -batch - <<'EOF'\nlink add eth1 mtu 1500" in text


@pytest.fixture
def templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private templates dir; the cached environment is reset around it."""
    monkeypatch.setattr(render, "templates_dir", lambda: tmp_path)
    (tmp_path / "veth").mkdir()
    render.environment.cache_clear()
    yield tmp_path
    render.environment.cache_clear()


def test_missing_attribute_raises_render_error_naming_template(templates: Path) -> None:
    (templates / "veth" / "add.j2").write_text("[{{ node }}] link add {{ link.a.no_such_field }}\n")
    with pytest.raises(RenderError, match=r"veth/add\.j2") as e:
        render_link(VETH, "add")
    assert "no_such_field" in str(e.value)


def test_template_syntax_error_names_file_and_line(templates: Path) -> None:
    (templates / "veth" / "add.j2").write_text("[{{ node }}] link set x up\n{% if %}\n")
    with pytest.raises(RenderError, match=r"add\.j2:2"):
        render_link(VETH, "add")


@pytest.mark.parametrize("line", [
    "[{{ node }}] link add a;reboot type dummy",
    "[{{ node }}] link add a type dummy # comment",
    "[{{ node }}] link add 'a b' type dummy",
    "[{{ node }}] link add a\\ b type dummy",
    "link add a type dummy",          # no [NETNS]
    "[] link add a type dummy",       # empty namespace
    "[{{ node }}]   ",                # no command
])
def test_unsafe_or_malformed_output_is_refused(templates: Path, line: str) -> None:
    (templates / "veth" / "add.j2").write_text(line + "\n")
    with pytest.raises(RenderError, match=r"veth/add\.j2: output line 1"):
        render_link(VETH, "add")


def test_render_environment_is_back_to_the_real_templates() -> None:
    # Guards the fixture above: later tests must see the project's templates again.
    assert render.templates_dir() == Path(render.__file__).resolve().parent / "templates"
    assert render_link(VETH, "del")[0].shell() == "ip -n pa link del eth1"


def test_rendering_does_not_look_up_the_templates_directory_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ADD, peer update and reconcile renders: `Path.resolve()` (a stat per path component)
    ran on each call and was 40 % of rendering one link. Resolved once per process now."""
    getattr(render.templates_dir, "cache_clear", lambda: None)()  # from a cold start
    render_link(VETH, "add")
    calls: list[Path] = []
    real = Path.resolve

    def counted(self: Path, strict: bool = False) -> Path:
        calls.append(self)
        return real(self, strict)

    monkeypatch.setattr(Path, "resolve", counted)
    for _ in range(3):
        assert render_link(VETH, "add") == render_link(VETH, "add")
    assert calls == []


def _plans_of_many_shapes() -> list[VethPlan | VxlanPlan | MacvlanPlan]:
    from meshnet.model import Impairments
    v4 = [ipaddress.ip_interface(f"10.1.{i}.1/30") for i in range(4)]
    v6 = [ipaddress.ip_interface(f"2001:db8:{i}::1/64") for i in range(4)]
    plans: list[VethPlan | VxlanPlan | MacvlanPlan] = []
    for i in range(4):
        a = Endpoint(f"pa{i}", f"eth{i + 1}", v4[i], mac=f"02:00:00:00:00:0{i}" if i % 2 else "")
        b = Endpoint(f"pb{i}", f"e{i}", v6[i], ips=tuple(v4[:i]), state="down" if i == 2 else "up",
                     impairments=Impairments(delay=1000 * (i + 1)) if i == 3 else None)
        plans.append(VethPlan(100 + i, a, b, None if i == 1 else f"node{i}", 1500 + i))
        plans.append(VxlanPlan(200 + i, b, 4096 + i, f"198.51.100.{i + 2}", "198.51.100.1", f"up{i}", None, 1450 + i))
        plans.append(MacvlanPlan(300 + i, Endpoint(f"pm{i}", f"m{i}", None if i % 2 else v4[i]), f"par{i}",
                                 f"node{i}", None if i % 2 else 9000))
    return plans


@pytest.mark.parametrize("action", render.ACTIONS)
def test_links_of_one_shape_render_from_a_recipe_exactly_as_alone(action: str) -> None:
    """Links that differ only in printed values (names, addresses, numbers) are rendered from their
    shape's recipe; links that differ in anything a template tests (an empty MAC, a family, a down
    end, impairments, no node namespace) get their own. Either way: line for line what rendering
    each link alone through its template gives."""
    render._RECIPES.clear()
    plans = _plans_of_many_shapes() * 2
    want = []
    for p in plans:
        template, name = render._template(action, p.kind)
        want += render._render_one(template, name, p)
    got = render.render(plans, action, render.ALL_CAPABILITIES)
    assert [c for c in got if c.tool == "ip"] == want
    assert [c.template for c in got if c.tool == "ip"] == [c.template for c in want]
    assert any(render._RECIPES.values()), "no recipe was made: the fast path went untested"


def test_a_recipe_is_refused_when_the_template_tests_a_printed_value(tmp_path: Path) -> None:
    """A template that branches on a value the recipes print (here the MTU) gets no recipe: the
    shape's first link checks its recipe against its own rendering, and links that follow are
    rendered one by one (the MTU 9000 link below keeps its jumbo line)."""
    (tmp_path / "veth").mkdir()
    (tmp_path / "veth" / "add.j2").write_text(
        "[{{ node }}] link add {{ link.a.intf }} type dummy\n"
        "{% if link.mtu > 1500 %}[{{ node }}] link set {{ link.a.intf }} mtu {{ link.mtu }}\n{% endif %}")
    render._RECIPES.clear()
    env = render.environment(str(tmp_path))
    template = env.get_template("veth/add.j2")
    small = VethPlan(1, Endpoint("pa", "eth1", None), Endpoint("pb", "eth1", None), None, 1500)
    jumbo = VethPlan(2, Endpoint("pa", "eth2", None), Endpoint("pb", "eth2", None), None, 9000)
    assert len(render._render_shaped(template, "veth/add.j2", small)) == 1
    assert [c.argv for c in render._render_shaped(template, "veth/add.j2", jumbo)] == [
        ("link", "add", "eth2", "type", "dummy"), ("link", "set", "eth2", "mtu", "9000")]
    assert list(render._RECIPES.values()) == [render._UNCACHEABLE]


def _recipe_templates() -> list[Path]:
    """The link templates (and their macros) that recipes are made from; the per-end ones (tc,
    end) are rendered end by end."""
    root = render.templates_dir()
    return [p for p in [*sorted(root.glob("*/*.j2")), root / "_macros.j2"] if p.parent.name not in ("tc", "end")]


def test_link_templates_only_print_the_values_recipes_fill_in() -> None:
    """A recipe holds for every link of a shape only if the templates never compare a value it
    fills in (a name, an address, a number): they may print it, or test whether it is set."""
    import re
    tests = re.compile(r"{%-?\s*(?:if|elif)\s+(.*?)\s*-?%}|{{[^}]*\bif\s+(.*?)\s+else\b")
    checked = set()
    for path in _recipe_templates():
        for m in tests.finditer(path.read_text()):
            for cond in re.split(r"\s+(?:and|or)\s+", m.group(1) or m.group(2)):
                field = cond.strip().removeprefix("not ").split(".")[-1].split()[0]
                checked.add(field)
                if field in render._SUBSTITUTED:
                    assert re.fullmatch(r"(not\s+)?[\w.]+", cond.strip()), f"{path.name}: {cond!r} compares {field}"
    assert {"mac", "mtu", "state", "version"} <= checked  # the scan does see the templates' tests


def test_link_templates_print_the_values_recipes_fill_in_as_they_are() -> None:
    """The other half of the rule: a filled-in value is printed bare (`{{ link.a.intf }}`), never
    through a filter, a slice or arithmetic, which a recipe's mark would pass through unchanged
    while the real value would not (`{{ intf[:8] }}` of the first link checks out; of a longer name
    it would not)."""
    import re
    printed = re.compile(r"{{-?\s*(.*?)\s*-?}}")
    names = re.compile(r"[A-Za-z_][\w.]*")
    seen = set()
    for path in _recipe_templates():
        for m in printed.finditer(path.read_text()):
            expr = m.group(1)
            for name in names.findall(expr):
                field = name.split(".")[-1]
                if field in render._SUBSTITUTED:
                    seen.add(field)
                    assert re.fullmatch(r"[\w.]+", expr), f"{path.name}: {{{{ {expr} }}}} does more than print {field}"
    assert {"intf", "netns", "mtu", "vni", "mac"} <= seen  # the scan does see the templates' prints


def test_warm_compiles_every_link_template_and_renders_each_kind() -> None:
    """meshnetd warms the renderer once its first pass is done: afterwards every link template is compiled
    (in the environment's cache) and each kind has a recipe, so a first ADD renders warm."""
    env = render.environment(str(render.templates_dir()))
    env.cache.clear()  # type: ignore[union-attr]
    render._RECIPES.clear()
    render.warm()
    compiled = {t.name for t in env.cache.values()}  # type: ignore[union-attr]
    assert {f"{k}/{a}.j2" for k in render.KINDS for a in render.ACTIONS} <= compiled
    assert "_macros.j2" in compiled
    made = {t.name for (t, _), recipe in render._RECIPES.items() if recipe}
    assert {f"{k}/add.j2" for k in render.KINDS} <= made
