"""meshnet.cni.protocol: env and config parsing, error JSON, result conversion between versions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshnet.cni import protocol, results
from meshnet.cni.protocol import CniError

FULL_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc-1.2_3",
    "CNI_NETNS": "/var/run/netns/mnt-x",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME=r1;K8S_POD_INFRA_CONTAINER_ID=abc",
    "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
}
CONF = {"cniVersion": "1.0.0", "name": "net", "type": "meshnet"}


def _code(exc_info: pytest.ExceptionInfo[CniError]) -> int:
    return exc_info.value.code


def test_error_codes_are_the_specs() -> None:
    p = protocol
    assert (p.INCOMPATIBLE_VERSION, p.UNSUPPORTED_FIELD, p.CONTAINER_UNKNOWN, p.INVALID_ENV) == (1, 2, 3, 4)
    assert (p.IO_FAILURE, p.DECODING_FAILURE, p.INVALID_NETWORK_CONFIG, p.TRY_AGAIN_LATER) == (5, 6, 7, 11)
    assert (p.TOPOLOGY_INVALID, p.LINK_PLUMBING_FAILED, p.STORE_UNAVAILABLE, p.PEER_UPDATE_FAILED) == (
        100,
        101,
        102,
        103,
    )
    assert protocol.INTERNAL == 999


def test_full_add_request() -> None:
    req = protocol.parse_request(FULL_ENV, json.dumps({**CONF, "delegate": {"type": "bridge"}, "log_file": "/l"}))
    assert (req.command, req.container_id, req.netns, req.ifname) == (
        "ADD",
        "abc-1.2_3",
        "/var/run/netns/mnt-x",
        "eth0",
    )
    assert req.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert req.args["IgnoreUnknown"] == "1"
    assert (req.pod_name, req.pod_namespace) == ("r1", "lab")
    assert req.conf.delegate == {"type": "bridge"}
    assert req.conf.daemon_socket == "/run/meshnet/meshnet.sock"
    assert req.conf.daemon_timeout == 240.0
    assert req.conf.log_file == "/l"
    assert req.conf.raw["delegate"] == {"type": "bridge"}


# Per spec section 2: which variables each command requires.
@pytest.mark.parametrize(
    ("command", "required", "optional"),
    [
        ("ADD", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"], ["CNI_ARGS", "CNI_PATH"]),
        ("DEL", ["CNI_CONTAINERID", "CNI_IFNAME"], ["CNI_NETNS", "CNI_ARGS", "CNI_PATH"]),
        ("CHECK", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"], ["CNI_ARGS"]),
        ("STATUS", [], ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]),
        ("GC", ["CNI_PATH"], ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"]),
    ],
)
def test_required_env_per_command(command: str, required: list[str], optional: list[str]) -> None:
    conf = {**CONF, "cniVersion": "1.1.0", protocol.VALID_ATTACHMENTS_KEY: []}
    env = {**FULL_ENV, "CNI_COMMAND": command}
    for var in required:
        with pytest.raises(CniError) as exc_info:
            protocol.parse_request({k: v for k, v in env.items() if k != var}, json.dumps(conf))
        assert _code(exc_info) == 4
        assert var in exc_info.value.msg
    minimal = {k: v for k, v in env.items() if k not in optional}
    assert protocol.parse_request(minimal, json.dumps(conf)).command == command


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CNI_CONTAINERID", "-starts-with-dash"),
        ("CNI_CONTAINERID", "has space"),
        ("CNI_IFNAME", "a" * 16),
        ("CNI_IFNAME", "eth/0"),
        ("CNI_IFNAME", "eth:0"),
        ("CNI_IFNAME", ".."),
        ("CNI_ARGS", "FOO=1;BAR"),
        ("CNI_ARGS", "=1"),
        ("CNI_COMMAND", "ADDD"),
    ],
)
def test_invalid_env_values(var: str, value: str) -> None:
    with pytest.raises(CniError) as exc_info:
        protocol.parse_request({**FULL_ENV, var: value}, json.dumps(CONF))
    assert _code(exc_info) == 4
    assert var in str(exc_info.value) or value in str(exc_info.value)


def test_cni_args_parsing() -> None:
    assert protocol.parse_cni_args("") == {}
    assert protocol.parse_cni_args("A=1;;B=x=y;") == {"A": "1", "B": "x=y"}


@pytest.mark.parametrize(
    ("stdin", "code", "needle"),
    [
        ("", 6, "decode"),
        ("[1, 2]", 6, "object"),
        ("{", 6, "decode"),
        ('{"name": "n", "type": "t"}', 7, "cniVersion"),
        ('{"cniVersion": "1.0.0", "type": "t"}', 7, "name"),
        ('{"cniVersion": "1.0.0", "name": "n", "type": ""}', 7, "type"),
        ('{"cniVersion": "0.2.0", "name": "n", "type": "t"}', 1, "0.2.0"),
        ('{"cniVersion": "2.0.0", "name": "n", "type": "t"}', 1, "2.0.0"),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "t", "delegate": "bridge"}', 7, "delegate"),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "t", "daemon_timeout": 0}', 7, "daemon_timeout"),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "t", "daemon_timeout": true}', 7, "daemon_timeout"),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "t", "prevResult": []}', 7, "prevResult"),
    ],
)
def test_invalid_netconf(stdin: str, code: int, needle: str) -> None:
    with pytest.raises(CniError) as exc_info:
        protocol.parse_netconf(stdin)
    assert _code(exc_info) == code
    assert needle.lower() in str(exc_info.value).lower()


@pytest.mark.parametrize(
    ("command", "too_old", "enough"),
    [("CHECK", "0.3.1", "0.4.0"), ("STATUS", "1.0.0", "1.1.0"), ("GC", "1.0.0", "1.1.0")],
)
def test_command_needs_a_new_enough_config(command: str, too_old: str, enough: str) -> None:
    env = {**FULL_ENV, "CNI_COMMAND": command}
    conf = {**CONF, protocol.VALID_ATTACHMENTS_KEY: []}
    with pytest.raises(CniError) as exc_info:
        protocol.parse_request(env, json.dumps({**conf, "cniVersion": too_old}))
    assert _code(exc_info) == 1
    assert protocol.parse_request(env, json.dumps({**conf, "cniVersion": enough})).conf.cni_version == enough


def test_gc_valid_attachments() -> None:
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni"}
    conf = {**CONF, "cniVersion": "1.1.0"}
    attached = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]
    req = protocol.parse_request(env, json.dumps({**conf, protocol.VALID_ATTACHMENTS_KEY: attached}))
    assert req.conf.valid_attachments == (protocol.Attachment("a", "eth0"), protocol.Attachment("b", "net1"))
    legacy = protocol.parse_request(env, json.dumps({**conf, "cni.dev/attachments": attached}))
    assert legacy.conf.valid_attachments == req.conf.valid_attachments
    request = protocol.parse_request(env, json.dumps({**conf, protocol.VALID_ATTACHMENTS_KEY: None}))
    assert request.conf.valid_attachments == ()
    with pytest.raises(CniError) as exc_info:  # without the list every attachment would look stale
        protocol.parse_request(env, json.dumps(conf))
    assert _code(exc_info) == 7
    with pytest.raises(CniError) as exc_info:
        protocol.parse_request(env, json.dumps({**conf, protocol.VALID_ATTACHMENTS_KEY: [{"containerID": "a"}]}))
    assert _code(exc_info) == 7


def test_version_cannot_be_a_request() -> None:
    with pytest.raises(CniError):
        protocol.parse_request({"CNI_COMMAND": "VERSION"}, "{}")


def test_error_to_dict() -> None:
    assert protocol.error_to_dict(CniError(101, "link plumbing failed", "eth1"), "0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 101,
        "msg": "link plumbing failed",
        "details": "eth1",
    }
    # details is optional in the spec: omitted when empty; unknown versions answer in the latest.
    assert protocol.error_to_dict(CniError(11, "later"), "9.9.9") == {"cniVersion": "1.1.0", "code": 11, "msg": "later"}
    internal = protocol.error_to_dict(KeyError("boom"), None)
    assert (internal["code"], internal["cniVersion"]) == (999, "1.1.0")
    assert "KeyError" in internal["details"] and "boom" in internal["details"]


def test_error_from_dict() -> None:
    err = CniError.from_dict({"code": 7, "msg": "bad", "details": "x"})
    assert (err.code, err.msg, err.details) == (7, "bad", "x")
    assert CniError.from_dict({"msg": "no code"}).code == 999


@pytest.mark.parametrize(
    ("stdin", "version"), [("", "1.1.0"), ('{"cniVersion": "0.3.0"}', "0.3.0"), ('{"cniVersion": "0.1.0"}', "1.1.0")]
)
def test_version_answer(stdin: str, version: str) -> None:
    supported = list(protocol.SUPPORTED_VERSIONS)
    assert protocol.version_answer(stdin) == {"cniVersion": version, "supportedVersions": supported}


# One result as every supported version writes it (formats per spec and libcni types 040/100).
RESULT_11: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01", "mtu": 1500},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/p", "pciID": "0000:00:01.0"},
    ],
    "ips": [
        {"interface": 1, "address": "203.0.113.5/24", "gateway": "203.0.113.1"},
        {"interface": 1, "address": "2001:db8::5/64"},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "203.0.113.1", "priority": 10}, {"dst": "198.51.100.0/24"}],
    "dns": {"nameservers": ["203.0.113.53"], "domain": "lab", "search": ["lab"], "options": ["ndots:2"]},
}
RESULT_10 = {
    **RESULT_11,
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/p"},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "203.0.113.1"}, {"dst": "198.51.100.0/24"}],
}
RESULT_04 = {
    **RESULT_10,
    "cniVersion": "0.4.0",
    "ips": [
        {"version": "4", "interface": 1, "address": "203.0.113.5/24", "gateway": "203.0.113.1"},
        {"version": "6", "interface": 1, "address": "2001:db8::5/64"},
    ],
}
BY_VERSION = {
    "0.3.0": {**RESULT_04, "cniVersion": "0.3.0"},
    "0.3.1": {**RESULT_04, "cniVersion": "0.3.1"},
    "0.4.0": RESULT_04,
    "1.0.0": RESULT_10,
    "1.1.0": RESULT_11,
}


@pytest.mark.parametrize("to_version", protocol.SUPPORTED_VERSIONS)
@pytest.mark.parametrize("from_version", ["1.1.0", "1.0.0", "0.4.0", "0.3.1"])
def test_convert_result(from_version: str, to_version: str) -> None:
    converted = results.convert_result(BY_VERSION[from_version], to_version)
    expected = BY_VERSION[to_version]
    if protocol.version_key(from_version) < (1, 1, 0) <= protocol.version_key(to_version):
        expected = {**RESULT_10, "cniVersion": to_version}  # fields that never existed cannot come back
    assert converted == expected


def test_convert_minimal_result_keeps_empty_dns() -> None:
    assert results.convert_result({"cniVersion": "0.3.1"}, "1.0.0") == {"cniVersion": "1.0.0", "dns": {}}


def test_convert_legacy_020_result() -> None:
    legacy = {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "203.0.113.5/24", "gateway": "203.0.113.1", "routes": [{"dst": "0.0.0.0/0"}]},
        "dns": {},
    }
    assert results.convert_result(legacy, "0.4.0") == {
        "cniVersion": "0.4.0",
        "ips": [{"version": "4", "address": "203.0.113.5/24", "gateway": "203.0.113.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"ips": [{"address": "203.0.113.5"}]},
        {"ips": "x"},
        {"interfaces": [{"mac": "aa"}]},
        {"routes": [{"gw": "203.0.113.1"}]},
        {"dns": []},
        {"ips": [{"address": "203.0.113.5/24", "interface": "0"}]},
    ],
)
def test_malformed_result_is_decoding_failure(bad: dict[str, Any]) -> None:
    with pytest.raises(CniError) as exc_info:
        results.convert_result({"cniVersion": "1.0.0", **bad}, "1.0.0")
    assert _code(exc_info) == 6


def test_convert_to_unsupported_version() -> None:
    with pytest.raises(CniError) as exc_info:
        results.convert_result(RESULT_10, "0.2.0")
    assert _code(exc_info) == 1
