"""meshnetd's flags for peer TLS, the gRPC listen address and the macvlan allow-list."""

from __future__ import annotations

import pytest

from meshnet.daemon.config import TlsPaths, parse_args
from meshnet.daemon.main import discover_node
from meshnet.executor import Executor


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "[::]", "*"])
def test_every_address_is_refused_without_tls(bind: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--grpc-bind", bind], env={})
    assert f"--grpc-bind {bind}: every address only with TLS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([], env={"GRPC_BIND": bind})


def test_every_address_is_allowed_with_tls() -> None:
    cfg = parse_args(["--grpc-bind", "0.0.0.0", "--node-name", "w1", "--tls-ca", "/t/ca.crt",
                      "--tls-cert", "/t/{node}.crt", "--tls-key", "/t/{node}.key"], env={})
    assert cfg.grpc_bind == "0.0.0.0"
    assert cfg.tls == TlsPaths("/t/ca.crt", "/t/w1.crt", "/t/w1.key")


def test_tls_from_the_daemonsets_environment() -> None:
    env = {"NODE_NAME": "kind-worker2", "MESHNET_TLS_CA": "/etc/meshnet/tls/ca.crt",
           "MESHNET_TLS_CERT": "/etc/meshnet/tls/{node}.crt", "MESHNET_TLS_KEY": "/etc/meshnet/tls/{node}.key"}
    cfg = parse_args([], env=env)
    assert cfg.tls == TlsPaths("/etc/meshnet/tls/ca.crt", "/etc/meshnet/tls/kind-worker2.crt",
                               "/etc/meshnet/tls/kind-worker2.key")
    assert cfg.grpc_bind == ""  # the VTEP address, found at start-up


@pytest.mark.parametrize(("argv", "message"), [
    (["--tls-ca", "/t/ca.crt"], "--tls-ca, --tls-cert and --tls-key go together"),
    (["--tls-ca", "a", "--tls-cert", "b", "--tls-key", "c", "--node-name", "../etc"], "--node-name (env NODE_NAME)"),
    (["--macvlan-parents", "eth0,averyveryverylongname0"], "--macvlan-parents (env MACVLAN_PARENTS): 'averyvery"),
    (["--macvlan-parents", "eth0,x/y"], "--macvlan-parents (env MACVLAN_PARENTS): 'x/y' contains '/'"),
])
def test_bad_flags_are_refused_naming_the_flag(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv, env={})
    assert message in capsys.readouterr().err


def test_macvlan_parents() -> None:
    assert parse_args([], env={}).macvlan_parents == ()  # default: no macvlan at all
    assert parse_args(["--macvlan-parents", "eth1, eth2,eth1"], env={}).macvlan_parents == ("eth1", "eth2")
    assert parse_args([], env={"MACVLAN_PARENTS": "*,eth0"}).macvlan_parents == ("*", "eth0")


@pytest.mark.root
def test_the_node_carries_the_allow_list() -> None:
    """discover_node hands the flag to the plan layer (NodeInfo), loopback standing in for the underlay."""
    cfg = parse_args(["--host-intf", "lo", "--host-ip", "127.0.0.1", "--macvlan-parents", "eth1"], env={})
    node = discover_node(cfg, Executor())
    assert node.uplink == "lo" and node.macvlan_parents == frozenset({"eth1"})
    single = discover_node(parse_args(["--single-node", "--macvlan-parents", "*"], env={}), Executor())
    assert single.vtep_ip == "127.0.0.1" and single.macvlan_parents == frozenset({"*"})
