"""Running delegate configs: fake plugins for the call protocol, real reference plugins as root."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from meshnet.cni import delegate as dl
from meshnet.cni import protocol
from meshnet.cni.protocol import CniError

# A stand-in plugin: logs how it was called, then answers as its config says.
FAKE_PLUGIN = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"plugin": os.path.basename(sys.argv[0]), "command": os.environ["CNI_COMMAND"],
                          "ifname": os.environ.get("CNI_IFNAME"), "conf": conf}}) + "\\n")
if "fail" in conf:
    print(json.dumps(conf["fail"]))
    sys.exit(1)
if "crash" in conf:
    sys.stderr.write(conf["crash"])
    sys.exit(2)
if os.environ["CNI_COMMAND"] == "ADD":
    result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "dns": {{}}}}
    result.setdefault("interfaces", []).append({{"name": conf["add_if"]}})
    if "add_ip" in conf:
        ip = {{"address": conf["add_ip"], "interface": len(result["interfaces"]) - 1}}
        if conf["cniVersion"] < "1.0.0":
            ip["version"] = "4"
        result.setdefault("ips", []).append(ip)
    print(json.dumps(result))
"""


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """(CNI env with a CNI_PATH holding fake plugins a, b, c; the call log)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("a", "b", "c"):
        plugin = bindir / name
        plugin.write_text(FAKE_PLUGIN.format(python=sys.executable))
        plugin.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/var/run/netns/mnt-none",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": f"{tmp_path / 'empty'}:{bindir}",
        "FAKE_LOG": str(log),
    }
    yield env, log


def _calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


CONFLIST = {
    "cniVersion": "0.4.0",
    "name": "kindnet",
    "plugins": [
        {"type": "a", "add_if": "eth0", "add_ip": "203.0.113.7/24"},
        {"type": "b", "add_if": "veth-host"},
        {"type": "c", "add_if": "portmap", "prevResult": {"stale": True}},
    ],
}


def test_add_runs_the_whole_list_in_order_chaining_prev_result(fake: tuple[dict[str, str], Path]) -> None:
    env, log = fake
    result = dl.run_delegate(CONFLIST, "ADD", env, "1.0.0", "meshnet")
    calls = _calls(log)
    assert [(c["plugin"], c["command"]) for c in calls] == [("a", "ADD"), ("b", "ADD"), ("c", "ADD")]
    for call in calls:  # the list's name and version win over meshnet's own
        assert (call["conf"]["name"], call["conf"]["cniVersion"]) == ("kindnet", "0.4.0")
    assert "prevResult" not in calls[0]["conf"]
    assert [i["name"] for i in calls[1]["conf"]["prevResult"]["interfaces"]] == ["eth0"]
    assert [i["name"] for i in calls[2]["conf"]["prevResult"]["interfaces"]] == ["eth0", "veth-host"]
    # The final result comes back in meshnet's version (1.0.0 has no "version" in ips).
    assert result == {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0"}, {"name": "veth-host"}, {"name": "portmap"}],
        "ips": [{"interface": 0, "address": "203.0.113.7/24"}],
        "dns": {},
    }


def test_del_runs_in_reverse_with_the_cached_result(fake: tuple[dict[str, str], Path]) -> None:
    env, log = fake
    cached = {"cniVersion": "1.0.0", "ips": [{"address": "203.0.113.7/24"}], "dns": {}}
    assert dl.run_delegate(CONFLIST, "DEL", env, "1.0.0", "meshnet", prev_result=cached) is None
    calls = _calls(log)
    assert [(c["plugin"], c["command"]) for c in calls] == [("c", "DEL"), ("b", "DEL"), ("a", "DEL")]
    expected_prev = {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "203.0.113.7/24"}], "dns": {}}
    assert all(c["conf"]["prevResult"] == expected_prev for c in calls)


def test_del_before_040_passes_no_prev_result(fake: tuple[dict[str, str], Path]) -> None:
    env, log = fake
    cached = {"cniVersion": "0.3.1", "dns": {}}
    dl.run_delegate({**CONFLIST, "cniVersion": "0.3.1"}, "DEL", env, "0.3.1", "meshnet", prev_result=cached)
    assert all("prevResult" not in c["conf"] for c in _calls(log))


def test_check_runs_in_order_with_the_cached_result(fake: tuple[dict[str, str], Path]) -> None:
    env, log = fake
    cached = {"cniVersion": "0.4.0", "dns": {}}
    assert dl.run_delegate(CONFLIST, "CHECK", env, "0.4.0", "meshnet", prev_result=cached) is None
    calls = _calls(log)
    assert [(c["plugin"], c["command"]) for c in calls] == [("a", "CHECK"), ("b", "CHECK"), ("c", "CHECK")]
    assert all(c["conf"]["prevResult"] == cached for c in calls)


def test_check_rules(fake: tuple[dict[str, str], Path]) -> None:
    env, log = fake
    cached = {"cniVersion": "0.4.0", "dns": {}}
    assert dl.run_delegate({**CONFLIST, "disableCheck": True}, "CHECK", env, "0.4.0", "m", prev_result=cached) is None
    assert _calls(log) == []
    with pytest.raises(CniError) as exc_info:
        dl.run_delegate({**CONFLIST, "cniVersion": "0.3.1"}, "CHECK", env, "0.4.0", "m", prev_result=cached)
    assert exc_info.value.code == 1
    with pytest.raises(CniError) as exc_info:
        dl.run_delegate(CONFLIST, "CHECK", env, "0.4.0", "m")
    assert exc_info.value.code == 7


def test_single_plugin_config_gets_meshnet_name_and_version_when_it_has_none(
    fake: tuple[dict[str, str], Path],
) -> None:
    env, log = fake
    result = dl.run_delegate({"type": "b", "add_if": "eth0"}, "ADD", env, "0.3.1", "meshnet")
    [call] = _calls(log)
    assert (call["conf"]["name"], call["conf"]["cniVersion"]) == ("meshnet", "0.3.1")
    assert result == {"cniVersion": "0.3.1", "interfaces": [{"name": "eth0"}], "dns": {}}


@pytest.mark.parametrize(("command", "calls"), [("STATUS", ["a", "b", "c"]), ("GC", ["a", "b", "c"])])
def test_status_and_gc_need_110(fake: tuple[dict[str, str], Path], command: str, calls: list[str]) -> None:
    env, log = fake
    dl.run_delegate(CONFLIST, command, env, "1.1.0", "m")  # a 0.4.0 list knows neither verb: nothing runs
    assert _calls(log) == []
    attached = (protocol.Attachment("c1", "eth0"),)
    dl.run_delegate({**CONFLIST, "cniVersion": "1.1.0"}, command, env, "1.1.0", "m", valid_attachments=attached)
    logged = _calls(log)
    assert [c["plugin"] for c in logged] == calls
    if command == "GC":
        assert logged[0]["conf"][protocol.VALID_ATTACHMENTS_KEY] == [{"containerID": "c1", "ifname": "eth0"}]


def test_missing_binary_names_type_and_path(fake: tuple[dict[str, str], Path]) -> None:
    env, _ = fake
    with pytest.raises(CniError) as exc_info:
        dl.run_delegate(
            {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "nonexistent"}]}, "ADD", env, "1.0.0", "m"
        )
    assert "nonexistent" in exc_info.value.msg
    assert env["CNI_PATH"] in exc_info.value.details


def test_plugin_error_propagates_with_its_code(fake: tuple[dict[str, str], Path]) -> None:
    env, log = fake
    first = {"type": "a", "add_if": "eth0"}
    failing = {**CONFLIST, "plugins": [first, {"type": "b", "fail": {"code": 7, "msg": "bad", "details": "x"}}]}
    with pytest.raises(CniError) as exc_info:
        dl.run_delegate(failing, "ADD", env, "1.0.0", "m")
    assert (exc_info.value.code, exc_info.value.msg) == (7, "bad")
    assert exc_info.value.details == "delegate plugin b: x"
    assert [c["plugin"] for c in _calls(log)] == ["a", "b"]


def test_plugin_crash_without_json_is_internal(fake: tuple[dict[str, str], Path]) -> None:
    env, _ = fake
    with pytest.raises(CniError) as exc_info:
        dl.run_delegate({"type": "a", "crash": "panic: nil map"}, "ADD", env, "1.0.0", "m")
    assert exc_info.value.code == 999
    assert "exit code 2" in exc_info.value.msg
    assert "panic: nil map" in exc_info.value.details


@pytest.mark.parametrize(
    "bad", [{"plugins": []}, {"plugins": [{"name": "no-type"}]}, {"cniVersion": "x.y", "type": "a"}, {"type": "../a"}]
)
def test_invalid_delegate_is_invalid_config(fake: tuple[dict[str, str], Path], bad: dict[str, Any]) -> None:
    env, _ = fake
    with pytest.raises(CniError) as exc_info:
        dl.run_delegate(bad, "ADD", env, "1.0.0", "m")
    assert exc_info.value.code == 7


def test_chained_prev_result() -> None:
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "dns": {}}
    conf = protocol.parse_netconf(
        json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "meshnet", "prevResult": prev}))
    assert dl.chained_prev_result(conf) == prev
    bare = protocol.parse_netconf(json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "meshnet"}))
    with pytest.raises(CniError) as exc_info:
        dl.chained_prev_result(bare)
    assert exc_info.value.code == 7
    assert dl.chained_prev_result(bare, "DEL") is None


# ---------------------------------------------------------------------------------------------
# Real reference plugins (bridge, host-local, tuning) in throw-away namespaces


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@contextmanager
def _netns(role: str) -> Iterator[str]:
    name = f"mnt-{role}-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.fixture
def real(tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[str, Any], str, str]]:
    """(env, conflist, host netns, pod netns): plugins run inside the throw-away "host" namespace."""
    with _netns("h") as host, _netns("p") as pod:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        # The bridge plugin builds its bridge in the namespace it runs in: keep that ours, not the machine's.
        for plugin in ("bridge", "host-local", "tuning"):
            wrapper = bindir / plugin
            wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {host} /usr/lib/cni/{plugin} "$@"\n')
            wrapper.chmod(0o755)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "mnt-net",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "mntbr0",
                    "isGateway": True,
                    "ipam": {"type": "host-local", "subnet": "203.0.113.0/24", "dataDir": str(tmp_path / "ipam")},
                },
                {"type": "tuning", "mtu": 1400, "dataDir": str(tmp_path / "tuning")},
            ],
        }
        env = {
            "CNI_CONTAINERID": "mnt" + secrets.token_hex(4),
            "CNI_NETNS": f"/var/run/netns/{pod}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(bindir),
        }
        try:
            yield env, conflist, host, pod
        finally:
            assert "mntbr0" not in _ip("-br", "link", "show"), "bridge leaked into the machine's namespace"


@pytest.mark.root
@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_real_conflist_add_check_del(real: tuple[dict[str, str], dict[str, Any], str, str], version: str) -> None:
    env, conflist, host, pod = real
    result = dl.run_delegate(conflist, "ADD", env, version, "meshnet")
    assert result is not None and result["cniVersion"] == version
    [ip] = result["ips"]
    assert ip["address"].startswith("203.0.113.") and ip["gateway"] == "203.0.113.1"
    assert ("version" in ip) == (version == "0.4.0")
    eth0 = json.loads(_ip("-n", pod, "-j", "addr", "show", "eth0"))[0]
    assert eth0["mtu"] == 1400  # the second plugin ran, on the first one's result
    assert [f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"] if a["family"] == "inet"] == [ip["address"]]
    assert "mntbr0" in _ip("-n", host, "-br", "link", "show")

    dl.run_delegate(conflist, "CHECK", env, version, "meshnet", prev_result=result)

    dl.run_delegate(conflist, "DEL", env, version, "meshnet", prev_result=result)
    assert "eth0" not in _ip("-n", pod, "-br", "link", "show")
    # DEL is idempotent: again, with things already gone.
    dl.run_delegate(conflist, "DEL", env, version, "meshnet", prev_result=result)


@pytest.mark.root
def test_real_plugin_error_propagates(real: tuple[dict[str, str], dict[str, Any], str, str]) -> None:
    env, conflist, _, pod = real
    with pytest.raises(CniError) as exc_info:
        dl.run_delegate({**conflist, "cniVersion": "9.0.0"}, "ADD", env, "1.0.0", "meshnet")
    assert exc_info.value.code == protocol.INCOMPATIBLE_VERSION
    assert "bridge" in exc_info.value.details
    assert "eth0" not in _ip("-n", pod, "-br", "link", "show")


@pytest.mark.root
def test_real_missing_binary(real: tuple[dict[str, str], dict[str, Any], str, str]) -> None:
    env, conflist, _, _ = real
    broken = {**conflist, "plugins": [*conflist["plugins"], {"type": "portmap"}]}
    with pytest.raises(CniError) as exc_info:
        dl.run_delegate(broken, "ADD", env, "1.0.0", "meshnet")
    assert "portmap" in exc_info.value.msg
    assert env["CNI_PATH"] in exc_info.value.details


def test_runtime_config_reaches_plugins_by_their_capabilities(tmp_path: Path) -> None:
    """As libcni: portMappings go to the plugin declaring that capability, and only to it."""
    seen = tmp_path / "seen"
    seen.mkdir()
    for name in ("capable", "plain"):
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\ncat > {seen}/{name}.json\n"
                          'echo \'{"cniVersion": "1.0.0", "interfaces": [], "ips": []}\'\n')
        script.chmod(0o755)
    conflist = {"cniVersion": "1.0.0", "name": "net", "plugins": [
        {"type": "plain"}, {"type": "capable", "capabilities": {"portMappings": True, "bandwidth": False}}]}
    env = {"CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0", "CNI_PATH": str(tmp_path)}
    runtime = {"portMappings": [{"hostPort": 8080, "containerPort": 80}], "bandwidth": {"ingressRate": 1}}
    dl.run_delegate(conflist, "ADD", env, "1.0.0", "net", runtime_config=runtime)
    capable = json.loads((seen / "capable.json").read_text())
    plain = json.loads((seen / "plain.json").read_text())
    assert capable["runtimeConfig"] == {"portMappings": runtime["portMappings"]}
    assert "runtimeConfig" not in plain
