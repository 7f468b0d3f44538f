"""The shim with meshnetd unreachable (issue 13): DEL completes, pods the topology index does not
list start, everything else is error 11. No root: the delegate is the real `host-local` plugin run
as a plugin of its own (it needs no namespace), and the daemon side runs over the sqlite store."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from meshnet.cni import offline, protocol
from meshnet.cni.delegate import delegate_part
from meshnet.cni.shim import dispatch
from meshnet.daemon.topo_index import TopologyIndex
from meshnet.model import Link, Topology, TopologyStatus
from meshnet.naming import mac_address
from meshnet.store.cache import Informer, TopologyCache
from meshnet.store.sqlite import SqliteStore

CNI_PATH = "/usr/lib/cni:/opt/cni/bin"
PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/mnt-pod"}],
    "ips": [{"interface": 0, "address": "203.0.113.5/24", "gateway": "203.0.113.1"}],
}


def _env(command: str, pod: str = "r1", cid: str = "c0ffee") -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/var/run/netns/mnt-pod",
            "CNI_IFNAME": "eth0", "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME={pod}",
            "CNI_PATH": CNI_PATH}


def _conf(tmp: Path, **extra: Any) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": "meshnet-net", "type": "meshnet",
                       "daemon_socket": str(tmp / "nowhere.sock"), "topology_index": str(tmp / "topo.json"),
                       "log_file": str(tmp / "cni.log"), **extra})


def _run(env: dict[str, str], stdin: str) -> tuple[int, Any, list[dict[str, Any]]]:
    out, err = io.StringIO(), io.StringIO()
    code = dispatch(env, stdin, out, err)
    logged = [json.loads(line) for line in err.getvalue().splitlines()]
    return code, json.loads(out.getvalue()) if out.getvalue() else None, logged


def _index(tmp: Path, *keys: tuple[str, str]) -> None:
    (tmp / "topo.json").write_bytes(offline.format_index(keys, 1, 0.0))


def _host_local(tmp: Path) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "eth0-net", "type": "host-local",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "203.0.113.0/24"}]], "dataDir": str(tmp / "ipam")}}


def _leases(tmp: Path) -> list[str]:
    d = tmp / "ipam" / "eth0-net"
    return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.exists() else []


# --- DEL ------------------------------------------------------------------------------------------


def test_chained_del_succeeds_and_says_so_in_the_log(tmp_path: Path) -> None:
    code, out, logged = _run(_env("DEL"), _conf(tmp_path, prevResult=PREV))
    assert (code, out) == (0, None)
    assert any(e.get("event") == "del-without-meshnetd" and e["mode"] == "chained" for e in logged)
    in_file = [json.loads(line) for line in (tmp_path / "cni.log").read_text().splitlines()]
    assert any(e.get("event") == "del-without-meshnetd" for e in in_file)


def test_delegate_add_then_del_by_the_shim_frees_the_lease(tmp_path: Path) -> None:
    _index(tmp_path, ("lab", "other"))
    code, result, _ = _run(_env("ADD"), _conf(tmp_path, delegate=_host_local(tmp_path)))
    assert code == 0, result
    assert result["ips"][0]["address"].startswith("203.0.113.")
    assert _leases(tmp_path) == [result["ips"][0]["address"].split("/")[0]]
    # The runtime's prevResult on DEL is meshnet's whole result; the delegate gets its own part.
    code, out, logged = _run(_env("DEL"), _conf(tmp_path, delegate=_host_local(tmp_path), prevResult=result))
    assert (code, out) == (0, None)
    assert _leases(tmp_path) == []
    assert any(e.get("event") == "del-without-meshnetd" and e["mode"] == "delegate" for e in logged)
    # Idempotent: a second DEL (and one for a sandbox never added) succeeds as well.
    assert _run(_env("DEL"), _conf(tmp_path, delegate=_host_local(tmp_path)))[0] == 0
    assert _run(_env("DEL", cid="never"), _conf(tmp_path, delegate=_host_local(tmp_path)))[0] == 0


def test_delegate_del_failure_is_reported(tmp_path: Path) -> None:
    broken = {"cniVersion": "1.0.0", "name": "x", "type": "no-such-plugin"}
    code, out, _ = _run(_env("DEL"), _conf(tmp_path, delegate=broken))
    assert code == 1 and "no-such-plugin" in out["msg"]


# --- ADD and CHECK --------------------------------------------------------------------------------


def test_add_of_a_pod_without_topology_passes_eth0_through_and_leaves_a_record(tmp_path: Path) -> None:
    _index(tmp_path, ("lab", "r2"), ("other", "r1"))
    code, result, logged = _run(_env("ADD"), _conf(tmp_path, prevResult=PREV))
    assert (code, result) == (0, {**PREV, "dns": {}})  # as meshnetd answers it: converted, validated
    assert any(e.get("event") == "add-without-meshnetd" for e in logged)
    (rec,), bad = offline.read_records(str(tmp_path / "topo.json"))
    assert bad == []
    assert rec == offline.Record("c0ffee", "lab", "r1", "/var/run/netns/mnt-pod", "eth0")
    # Its DEL (daemon still down) takes the record away again.
    assert _run(_env("DEL"), _conf(tmp_path, prevResult=PREV))[0] == 0
    assert offline.read_records(str(tmp_path / "topo.json")) == ([], [])


def test_add_of_a_pod_with_topology_is_try_again_later(tmp_path: Path) -> None:
    _index(tmp_path, ("lab", "r1"))
    code, out, _ = _run(_env("ADD"), _conf(tmp_path, prevResult=PREV))
    assert (code, out["code"]) == (1, protocol.TRY_AGAIN_LATER)
    assert "lab/r1 has a Topology" in out["details"] and "nowhere.sock" in out["details"]
    assert not (tmp_path / "topo.pending").exists()


@pytest.mark.parametrize("content", [
    None,  # missing
    b"",
    b"{not json",
    b'{"format": 2, "generation": 1, "topologies": []}',
    b'{"format": 1, "generation": -1, "topologies": []}',
    b'{"format": 1, "generation": 1, "topologies": "lab/r2"}',
    b'{"format": 1, "generation": 1, "topologies": ["lab"]}',
    b'{"format": 1, "generation": 1, "topologies": ["Lab/r2"]}',
    b'{"format": 1, "generation": 1, "topologies": ["lab/r2/x"]}',
    b'{"format": 1, "generation": 1, "topologies": [7]}',
    b'{"format": 1, "generation": 1, "topologies": []}' + b" " * offline.MAX_INDEX_BYTES,
])
def test_missing_or_damaged_index_is_try_again_later(tmp_path: Path, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / "topo.json").write_bytes(content)
    code, out, _ = _run(_env("ADD"), _conf(tmp_path, prevResult=PREV))
    assert (code, out["code"]) == (1, protocol.TRY_AGAIN_LATER)
    assert "topology index" in out["details"]
    assert not (tmp_path / "topo.pending").exists()


def test_check_and_gc_are_still_try_again_later(tmp_path: Path) -> None:
    _index(tmp_path)
    code, out, _ = _run(_env("CHECK"), _conf(tmp_path, prevResult=PREV))
    assert (code, out["code"]) == (1, protocol.TRY_AGAIN_LATER)


def test_chained_add_without_prev_result_is_refused(tmp_path: Path) -> None:
    _index(tmp_path)
    code, out, _ = _run(_env("ADD"), _conf(tmp_path))
    assert (code, out["code"]) == (1, protocol.INVALID_NETWORK_CONFIG)


def test_invalid_pod_name_is_refused(tmp_path: Path) -> None:
    _index(tmp_path)
    code, out, _ = _run(_env("ADD", pod="R_1"), _conf(tmp_path, prevResult=PREV))
    assert (code, out["code"]) == (1, protocol.INVALID_ENV) and "K8S_POD_NAME" in out["msg"]


def test_bad_index_path_is_refused(tmp_path: Path) -> None:
    code, out, _ = _run(_env("ADD"), _conf(tmp_path, prevResult=PREV, topology_index="relative.json"))
    assert (code, out["code"]) == (1, protocol.INVALID_NETWORK_CONFIG) and "topology_index" in out["msg"]


def test_add_the_daemon_accepted_is_not_done_twice(tmp_path: Path) -> None:
    """A daemon that took the ADD and did not answer may be half-way through it: error 11, no eth0."""
    import socket

    _index(tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "nowhere.sock"))
    listener.listen(8)
    try:
        code, out, _ = _run(_env("ADD"), _conf(tmp_path, prevResult=PREV, daemon_timeout=0.2))
    finally:
        listener.close()
    assert (code, out["code"]) == (1, protocol.TRY_AGAIN_LATER) and "did not answer" in out["msg"]
    assert not (tmp_path / "topo.pending").exists()


# --- formats ----------------------------------------------------------------------------------------


def test_index_round_trip() -> None:
    keys = {("lab", "r1"), ("default", "a.b-c")}
    assert offline.parse_index(offline.format_index(keys, 3, 1.5)) == keys


@pytest.mark.parametrize(("field", "value"), [
    ("container_id", "other"), ("container_id", "../x"), ("namespace", "Lab"), ("pod", ""),
    ("netns", "relative"), ("netns", "/a\0b"), ("ifname", "a/b"), ("ifname", "x" * 16),
])
def test_damaged_records_are_refused(field: str, value: str) -> None:
    rec = {"container_id": "c1", "namespace": "lab", "pod": "r1", "netns": "/var/run/netns/x", "ifname": "eth0"}
    assert offline.parse_record(json.dumps(rec).encode(), "c1").pod == "r1"
    with pytest.raises(ValueError):
        offline.parse_record(json.dumps({**rec, field: value}).encode(), "c1")


def test_delegate_part_strips_meshnets_interfaces_by_their_mac() -> None:
    ours = {"name": "eth1", "mac": mac_address("lab", "r1", "eth1"), "sandbox": "/var/run/netns/p"}
    whole = {**PREV, "interfaces": [ours, *PREV["interfaces"]],
             "ips": [{"interface": 0, "address": "10.0.0.1/30"}, {**PREV["ips"][0], "interface": 1}]}
    assert delegate_part(whole, "lab", "r1") == PREV
    assert delegate_part(whole, "lab", "r2") == whole  # another pod's MACs: not ours
    assert delegate_part(None, "lab", "r1") is None


# --- the daemon's side -------------------------------------------------------------------------------


def _topo(name: str, **status: Any) -> Topology:
    return Topology(name, "lab", (Link(1, "r2" if name == "r1" else "r1", "eth1", "eth1"),),
                    TopologyStatus(**status))


def test_index_follows_the_store_and_adopts_recorded_pods(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "store.db"))
    path = str(tmp_path / "topo.json")
    calls: list[tuple[str, dict[str, str]]] = []
    logged: list[dict[str, Any]] = []
    index = TopologyIndex(path, lambda c, env, stdin: calls.append((c, dict(env))), lambda **e: logged.append(e))
    netns = tmp_path / "netns-r1"
    netns.touch()
    offline.write_record(path, offline.Record("cid1", "lab", "r1", str(netns), "eth0"))
    offline.write_record(path, offline.Record("gone", "lab", "r2", str(tmp_path / "nope"), "eth0"))
    (tmp_path / "topo.pending" / "junk.json").write_text("{")
    store.apply(_topo("r2"))
    stopping = threading.Event()
    # As in meshnetd: the index follows the informer's one watch, and refreshes from its cache.
    cache = TopologyCache()
    informer = Informer(cache, [index.on_event])
    watcher = threading.Thread(target=informer.run, args=(store, stopping))
    watcher.start()
    thread = threading.Thread(target=index.run, args=(cache, stopping, 30.0))
    thread.start()
    try:
        _wait(lambda: offline.read_index(path) == {("lab", "r2")})
        # The damaged record and the one whose namespace is gone are dropped; r1 has no Topology yet.
        assert [r.container_id for r in offline.read_records(path)[0]] == ["cid1"]
        assert calls == []
        store.apply(_topo("r1"))  # the Topology appears: the sandbox the shim set up is adopted
        _wait(lambda: len(calls) == 1)
        command, env = calls[0]
        assert command == "ADD" and env["CNI_CONTAINERID"] == "cid1" and env["CNI_NETNS"] == str(netns)
        assert "K8S_POD_NAME=r1" in env["CNI_ARGS"]
        _wait(lambda: offline.read_index(path) == {("lab", "r1"), ("lab", "r2")})
        assert offline.read_records(path) == ([], [])
        store.delete("lab", "r2")
        _wait(lambda: offline.read_index(path) == {("lab", "r1")})
    finally:
        stopping.set()
        thread.join(10)
        watcher.join(10)
        store.close()
    assert {e["event"] for e in logged} >= {"pending-record-damaged", "pending-dropped", "adopted"}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_runtime_calls_through_the_daemon_make_records_stale(tmp_path: Path) -> None:
    path = str(tmp_path / "topo.json")
    index = TopologyIndex(path, lambda *a: None, lambda **e: None)
    for cid, pod in (("a1", "r1"), ("b1", "r2"), ("c1", "r3")):
        offline.write_record(path, offline.Record(cid, "lab", pod, "/x", "eth0"))
    index.load_records()
    handled = index.wrap(lambda command, env, stdin: command)
    assert handled("DEL", _env("DEL", pod="r1", cid="a1"), "") == "DEL"
    assert handled("ADD", _env("ADD", pod="r2", cid="b2"), "") == "ADD"  # a newer sandbox of r2
    assert [r.container_id for r in offline.read_records(path)[0]] == ["c1"]


def test_a_live_newer_sandbox_keeps_the_pod(tmp_path: Path) -> None:
    path = str(tmp_path / "topo.json")
    calls: list[str] = []
    index = TopologyIndex(path, lambda c, env, stdin: calls.append(c), lambda **e: None)
    (tmp_path / "old").touch()
    (tmp_path / "new").touch()
    offline.write_record(path, offline.Record("old", "lab", "r1", str(tmp_path / "old"), "eth0"))
    index.load_records()
    index.adopt([_topo("r1", src_ip="198.51.100.2", net_ns=str(tmp_path / "new"), container_id="new")])
    assert calls == [] and offline.read_records(path) == ([], [])


def _wait(cond: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except offline.IndexUnavailable:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
