"""Executor against a faked `ip` (pytest-subprocess): batching, stdin, dry-run, errors, rollback, journal.

plumbum resolves `local["ip"]` to its full path (/usr/sbin/ip), so the fakes are registered with
`fp.program("ip")`, which matches any path ending in `ip`. The executor writes a batch to the
process's stdin pipe through `communicate`; the `ip_calls` fixture records what each fake process
was given there, so every test sees the exact argv and stdin of every `ip`.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pytest_subprocess import FakeProcess
from pytest_subprocess.fake_popen import FakePopen

from meshnet.command import Command
from meshnet.executor import (
    CommandFailed,
    Executor,
    Journal,
    LinkExists,
    LinkNotFound,
    NetnsNotFound,
    open_journal,
)

Call = tuple[tuple[str, ...], str]  # (argv, stdin)


@pytest.fixture
def ip_calls(fp: FakeProcess, monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    calls: list[Call] = []
    lock = threading.Lock()
    communicate = FakePopen.communicate

    def capturing_communicate(self: FakePopen, input: Any = None, timeout: float | None = None) -> Any:
        text = input.decode() if isinstance(input, bytes) else str(input or "")
        with lock:
            calls.append((tuple(str(a) for a in self.args), text))
        return communicate(self, input, timeout)

    monkeypatch.setattr(FakePopen, "communicate", capturing_communicate)
    return calls


def ip_argv(fp: FakeProcess, netns: str | None, *, force: bool = False) -> list[Any]:
    return [fp.program("ip"), *(["-n", netns] if netns else []), *(["-force"] if force else []), "-batch", "-"]


def veth(uid: int, a: str, b: str, intf: str, node: str | None = "node") -> list[Command]:
    # As templates/veth/add.j2 would render them (the executor runs `link add` from templates only).
    t = "veth/add.j2"
    return [
        Command(node, ("link", "add", intf, "netns", a, "type", "veth", "peer", "name", intf, "netns", b), uid, t),
        Command(a, ("link", "set", intf, "up"), uid, t),
        Command(b, ("link", "set", intf, "up"), uid, t),
    ]


def by_netns(calls: Sequence[Call]) -> dict[str, list[str]]:
    """argv without the program → stdin lines (batches of one phase run in parallel threads)."""
    return {" ".join(argv[1:]): stdin.splitlines() for argv, stdin in calls}


def test_canary_ip_is_intercepted(fp: FakeProcess, ip_calls: list[Call]) -> None:
    # For real this fails ("Cannot open network namespace"): the namespace does not exist.
    ghost = f"mnt-ghost-{secrets.token_hex(4)}"
    assert not Path("/var/run/netns", ghost).exists()
    fp.register(ip_argv(fp, ghost))
    Executor().apply([Command(ghost, ("link", "set", "lo", "up"))])
    assert ip_calls == [(("/usr/sbin/ip", "-n", ghost, "-batch", "-"), "link set lo up\n")]
    assert len(fp.calls) == 1


def test_unregistered_ip_is_not_run_for_real(fp: FakeProcess) -> None:
    with pytest.raises(fp.exceptions.ProcessNotRegisteredError):
        Executor().apply([Command("mnt-nowhere", ("link", "set", "lo", "up"))])


def test_one_batch_per_namespace_and_phase(fp: FakeProcess, ip_calls: list[Call]) -> None:
    cmds = veth(1, "pa", "pb", "eth1") + veth(2, "pa", "pc", "eth2") + veth(3, "pb", "pc", "eth3", node=None)
    for ns in ("node", None, "pa", "pb", "pc"):
        fp.register(ip_argv(fp, ns))
    Executor().apply(cmds)
    assert len(fp.calls) == 5  # creations: node, "."; then pa, pb, pc
    assert by_netns(ip_calls) == {
        "-n node -batch -": ["link add eth1 netns pa type veth peer name eth1 netns pb",
                             "link add eth2 netns pa type veth peer name eth2 netns pc"],
        "-batch -": ["link add eth3 netns pb type veth peer name eth3 netns pc"],
        "-n pa -batch -": ["link set eth1 up", "link set eth2 up"],
        "-n pb -batch -": ["link set eth1 up", "link set eth3 up"],
        "-n pc -batch -": ["link set eth2 up", "link set eth3 up"],
    }
    # creations ran before any addressing
    first_phase = {" ".join(a[1:]) for a, _ in ip_calls[:2]}
    assert first_phase == {"-n node -batch -", "-batch -"}


def test_stdin_is_exactly_one_line_per_command(fp: FakeProcess, ip_calls: list[Call]) -> None:
    fp.register(ip_argv(fp, "pa"))
    cmds = [Command("pa", ("addr", "add", "10.0.0.1/30", "dev", "eth1"), template="veth/add.j2"),
            Command("pa", ("link", "set", "eth1", "up"), template="veth/add.j2")]
    Executor().apply(cmds)
    assert ip_calls[0][1] == "addr add 10.0.0.1/30 dev eth1\nlink set eth1 up\n"


def test_dry_run_runs_nothing_and_records(fp: FakeProcess) -> None:
    ex = Executor(dry_run=True)
    cmds = veth(1, "pa", "pb", "eth1")
    ex.apply(cmds)
    assert ex.run_best_effort(cmds[:1]) == []
    assert len(fp.calls) == 0
    assert ex.recorded == [*cmds, cmds[0]]
    assert ex.journal.entries == []


@pytest.mark.parametrize(("stderr", "error"), [
    ("RTNETLINK answers: File exists\nCommand failed -:2\n", LinkExists),
    ('Cannot find device "eth9"\nCommand failed -:2\n', LinkNotFound),
    ('Cannot open network namespace "pz": No such file or directory\nCommand failed -:2\n', NetnsNotFound),
    ("RTNETLINK answers: Operation not permitted\nCommand failed -:2\n", CommandFailed),
])
def test_errors_are_typed_and_name_the_failing_command(fp: FakeProcess, ip_calls: list[Call], stderr: str,
                                                       error: type[CommandFailed]) -> None:
    cmds = [Command("pa", ("link", "set", "eth1", "up")), Command("pa", ("link", "set", "eth9", "up")),
            Command("pa", ("link", "set", "eth3", "up"))]
    fp.register(ip_argv(fp, "pa"), stderr=stderr, returncode=1)
    with pytest.raises(CommandFailed) as e:
        Executor().apply(cmds)
    assert type(e.value) is error
    assert e.value.command == cmds[1]
    assert "link set eth9 up" in str(e.value) and "pa" in str(e.value)
    assert e.value.stderr == stderr
    assert len(fp.calls) == 1  # nothing created by the batch: no rollback process


def test_rollback_deletes_exactly_what_lines_before_the_failure_created(fp: FakeProcess,
                                                                        ip_calls: list[Call]) -> None:
    cmds = veth(1, "pa", "pb", "eth1") + veth(2, "pa", "pc", "eth2") + veth(3, "pb", "pc", "eth3")
    fp.register(ip_argv(fp, "node"), stderr="RTNETLINK answers: File exists\nCommand failed -:3\n", returncode=1)
    fp.register(ip_argv(fp, "pa", force=True))
    with pytest.raises(LinkExists) as e:
        Executor().apply(cmds)
    assert e.value.command == cmds[6]
    assert len(fp.calls) == 2
    assert ip_calls[1] == (("/usr/sbin/ip", "-n", "pa", "-force", "-batch", "-"), "link del eth2\nlink del eth1\n")


def test_rollback_includes_earlier_successful_batches(fp: FakeProcess, ip_calls: list[Call]) -> None:
    # Phase 1 (creations) succeeds in two node namespaces; phase 2 fails in pb at line 1.
    cmds = veth(1, "pa", "pb", "eth1", node="n1") + veth(2, "pc", "pd", "eth2", node="n2")
    fp.register(ip_argv(fp, "n1"))
    fp.register(ip_argv(fp, "n2"))
    fp.register(ip_argv(fp, "pa"))
    fp.register(ip_argv(fp, "pb"), stderr='Cannot find device "eth1"\nCommand failed -:1\n', returncode=1)
    fp.register(ip_argv(fp, "pc"))
    fp.register(ip_argv(fp, "pd"))
    fp.register(ip_argv(fp, "pa", force=True))
    fp.register(ip_argv(fp, "pc", force=True))
    with pytest.raises(LinkNotFound):
        Executor().apply(cmds)
    undo = by_netns(ip_calls[-2:])
    assert undo == {"-n pa -force -batch -": ["link del eth1"], "-n pc -force -batch -": ["link del eth2"]}
    assert len(fp.calls) == 8


def test_failure_without_line_number_rolls_back_only_earlier_batches(fp: FakeProcess, ip_calls: list[Call]) -> None:
    cmds = veth(1, "pa", "pb", "eth1")
    fp.register(ip_argv(fp, "node"), stderr="Segmentation fault\n", returncode=139)
    with pytest.raises(CommandFailed) as e:
        Executor().apply(cmds)
    assert e.value.command is None and "-batch" in str(e.value)
    assert len(fp.calls) == 1


def test_run_best_effort_tolerates_what_is_already_gone(fp: FakeProcess, ip_calls: list[Call]) -> None:
    fp.register(ip_argv(fp, "pa", force=True),
                stderr='Cannot find device "eth1"\nCommand failed -:1\nCannot find device "eth2"\nCommand failed -:2\n',
                returncode=1)
    cmds = [Command("pa", ("link", "del", "eth1")), Command("pa", ("link", "del", "eth2"))]
    assert Executor().run_best_effort(cmds) == []
    assert ip_calls == [(("/usr/sbin/ip", "-n", "pa", "-force", "-batch", "-"), "link del eth1\nlink del eth2\n")]


def test_run_best_effort_reports_other_errors(fp: FakeProcess) -> None:
    fp.register(ip_argv(fp, "pa", force=True),
                stderr='Cannot find device "eth1"\nCommand failed -:1\nRTNETLINK answers: Operation not permitted\n'
                       "Command failed -:2\n", returncode=1)
    cmds = [Command("pa", ("link", "del", "eth1")), Command("pa", ("link", "del", "eth2"))]
    assert Executor().run_best_effort(cmds) == ["RTNETLINK answers: Operation not permitted"]


def test_journal_records_every_batch(fp: FakeProcess, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    cmds = veth(1, "pa", "pb", "eth1")
    for ns in ("node", "pa"):
        fp.register(ip_argv(fp, ns))
    fp.register(ip_argv(fp, "pb"), stderr="RTNETLINK answers: Operation not permitted\nCommand failed -:1\n",
                returncode=2)
    fp.register(ip_argv(fp, "pa", force=True))
    with pytest.raises(CommandFailed):
        Executor(journal=journal).apply(cmds)
    entries = journal.entries
    assert len(entries) == 4 == len(fp.calls)
    by_ns = {e["netns"]: e for e in entries[:3]}
    assert by_ns["node"]["rc"] == 0 and by_ns["node"]["commands"] == [" ".join(cmds[0].argv)]
    assert by_ns["pb"]["rc"] == 2 and "Operation not permitted" in by_ns["pb"]["error"]
    assert entries[3]["netns"] == "pa" and entries[3]["commands"] == ["link del eth1"]
    on_disk = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert on_disk == entries


def test_daemon_journal_keeps_nothing_in_memory(fp: FakeProcess, tmp_path: Path) -> None:
    """meshnetd's journal (keep=0) goes to its file only: nothing in the daemon reads it back, and
    held in memory it grew with every batch (issue 14 item 6)."""
    journal = open_journal(tmp_path / "journal.jsonl", keep=0)
    fp.register(ip_argv(fp, None))
    Executor(journal=journal).apply([Command(None, ("link", "set", "eth1", "up"))])
    assert journal.entries == []
    on_disk = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [e["commands"] for e in on_disk] == [["link set eth1 up"]]


def test_show_parses_json_and_maps_errors(fp: FakeProcess) -> None:
    fp.register([fp.program("ip"), "-n", "pa", "-j", "-d", "addr", "show"], stdout='[{"ifname": "eth1"}]')
    assert Executor().show("pa") == [{"ifname": "eth1"}]
    fp.register([fp.program("ip"), "-n", "pz", "-j", "-d", "addr", "show"],
                stderr='Cannot open network namespace "pz": No such file or directory\n', returncode=1)
    with pytest.raises(NetnsNotFound):
        Executor().show("pz")


def test_every_executed_command_reaches_the_structured_log(fp: FakeProcess) -> None:
    """`kubectl logs` alone must tell what meshnet ran: each batch event lists its lines."""
    events: list[dict[str, Any]] = []
    cmds = veth(1, "pa", "pb", "eth1")
    for ns in ("node", "pa", "pb"):
        fp.register(ip_argv(fp, ns))
    Executor(log=lambda **e: events.append(e)).apply(cmds)
    logged = [line for e in events if e["event"] == "ip-batch" for line in e["lines"]]
    assert sorted(logged) == sorted(" ".join(c.argv) for c in cmds)
    assert all(e["rc"] == 0 and e["commands"] == len(e["lines"]) for e in events)


# --- tc: impairments of link ends ----------------------------------------------------------------

def tc_argv(fp: FakeProcess, netns: str | None, *, force: bool = False) -> list[Any]:
    return [fp.program("tc"), *(["-n", netns] if netns else []), *(["-force"] if force else []), "-batch", "-"]


def test_tc_runs_as_its_own_batch_per_namespace_once_the_links_exist(fp: FakeProcess, ip_calls: list[Call]) -> None:
    tc = [Command("pa", ("qdisc", "add", "dev", "eth1", "root", "handle", "1:", "tbf", "rate", "8mbit",
                         "burst", "15140", "latency", "50ms"), 1, "tc/add.j2", "tc"),
          Command("pb", ("qdisc", "add", "dev", "eth1", "root", "handle", "1:", "tbf", "rate", "8mbit",
                         "burst", "15140", "latency", "50ms"), 1, "tc/add.j2", "tc")]
    for ns in ("node", "pa", "pb"):
        fp.register(ip_argv(fp, ns))
    fp.register(tc_argv(fp, "pa"))
    fp.register(tc_argv(fp, "pb"))
    ex = Executor()
    ex.apply(tc + veth(1, "pa", "pb", "eth1"))  # given first, run after the creation: qdiscs need interfaces
    programs = [a[0].rsplit("/", 1)[-1] for a, _ in ip_calls]
    assert programs[0] == "ip" and sorted(programs[1:]) == ["ip", "ip", "tc", "tc"]
    tc_calls = sorted(" ".join(a[1:]) for a, _ in ip_calls if a[0].endswith("/tc"))
    assert tc_calls == ["-n pa -batch -", "-n pb -batch -"]
    assert sorted(e.get("tool", "ip") for e in ex.journal.entries) == ["ip", "ip", "ip", "tc", "tc"]


def test_a_failed_tc_batch_rolls_the_links_back(fp: FakeProcess, ip_calls: list[Call]) -> None:
    fp.register(ip_argv(fp, "node"))
    fp.register(ip_argv(fp, "pa"))
    fp.register(ip_argv(fp, "pb"))
    fp.register(tc_argv(fp, "pa"), returncode=2,
                stderr="Error: Specified qdisc kind is unknown.\nCommand failed -:1\n")
    fp.register(ip_argv(fp, "pa", force=True))
    bad = Command("pa", ("qdisc", "add", "dev", "eth1", "root", "handle", "2:", "netem", "delay", "20ms"), 1,
                  "tc/add.j2", "tc")
    with pytest.raises(CommandFailed) as e:
        Executor().apply([*veth(1, "pa", "pb", "eth1"), bad])
    assert "qdisc kind is unknown" in str(e.value) and e.value.command == bad
    assert ip_calls[-1] == (("/usr/sbin/ip", "-n", "pa", "-force", "-batch", "-"), "link del eth1\n")


def test_removing_absent_impairments_is_fine(fp: FakeProcess) -> None:
    fp.register(tc_argv(fp, "pa", force=True), returncode=2,
                stderr="Error: Cannot delete qdisc with handle of zero.\nCommand failed -:1\n")
    clear = Command("pa", ("qdisc", "del", "dev", "eth1", "root"), 1, "tc/clear.j2", "tc")
    assert Executor().run_best_effort([clear]) == []


@pytest.mark.parametrize(("rc", "netem"), [(0, True), (2, False)])
def test_netem_capability_is_probed_once_in_a_throw_away_namespace(fp: FakeProcess, rc: int, netem: bool) -> None:
    fp.register([fp.program("unshare"), "-n", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                returncode=rc, stderr="" if rc == 0 else "Error: Specified qdisc kind is unknown.\n")
    logged: list[dict[str, Any]] = []
    ex = Executor(log=lambda **kw: logged.append(kw))
    assert ex.capabilities().netem is netem
    assert ex.capabilities().netem is netem  # no second probe: only one process was registered
    assert len(fp.calls) == 1
    assert logged == [{"event": "capabilities", "netem": netem}]


def test_a_missing_tc_is_a_typed_failure(fp: FakeProcess) -> None:
    ex = Executor(tc="mnt-no-such-tc")
    with pytest.raises(CommandFailed, match="mnt-no-such-tc: command not found"):
        ex.apply([Command("pa", ("qdisc", "add", "dev", "eth1", "root", "tbf"), 1, "tc/add.j2", "tc")])
    assert Executor(unshare="mnt-no-such-unshare").capabilities().netem is False


def test_a_file_exists_failure_is_logged_as_info_other_failures_as_errors(fp: FakeProcess) -> None:
    """"File exists" is mostly a race the caller handles (and logs as handled): it must not read as an error."""
    events: list[dict[str, Any]] = []
    executor = Executor(log=lambda **e: events.append(e))
    for stderr, error in (("RTNETLINK answers: File exists\nCommand failed -:1\n", LinkExists),
                          ("RTNETLINK answers: Operation not permitted\nCommand failed -:1\n", CommandFailed)):
        fp.register(ip_argv(fp, "node"), stderr=stderr, returncode=1)
        with pytest.raises(error):
            executor.apply(veth(1, "pa", "pb", "eth1"))
    assert [(e["rc"], e["level"]) for e in events] == [(1, "info"), (1, "error")]
