"""The node-local record of the pods' namespaces (daemon/sandboxes.py) on real namespaces: what it
vouches for, what it refuses, and what a restarted daemon finds again (issue 12, item 3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshnet import naming
from meshnet.daemon import kernel
from meshnet.daemon.sandboxes import SandboxRecord, netns_problem
from meshnet.model import LinkStatus, Topology, TopologyStatus
from tests.netns import ip, netns_set

pytestmark = pytest.mark.root

KEY = ("default", "r1")


def test_a_pods_namespace_is_vouched_for() -> None:
    with netns_set(1) as (ns,):
        assert netns_problem(f"/var/run/netns/{ns}") is None


@pytest.mark.parametrize(("path", "why"), [
    ("/proc/self/ns/net", "the daemon's own"),
    ("/proc/thread-self/ns/net", "the daemon's own"),
    ("/proc/self/ns/mnt", "not a network namespace"),
    ("/proc/self/ns/uts", "not a network namespace"),
    ("/etc/hostname", "not a namespace"),
    ("/var/run/netns", "not a namespace"),
    ("/var/run/netns/mnt-does-not-exist", "No such file"),
    ("relative/path", "not an absolute path"),
    ("/var/run/netns/x\n. netns exec x touch /tmp/CANARY", "not an absolute path"),
    ("", "not an absolute path"),
])
def test_what_is_not_a_pods_network_namespace_is_refused(path: str, why: str) -> None:
    problem = netns_problem(path)
    assert problem is not None and why in problem


def test_the_hosts_namespace_is_refused_from_a_node_namespace() -> None:
    """In the lab (and under a container runtime) the daemon's namespace is not the host's: the
    host's is refused (by the inode of /proc/1/ns/net, or because it cannot even be opened from
    there). Run from inside a node namespace."""
    with netns_set(1) as (ns,):
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                              "from meshnet.daemon.sandboxes import netns_problem; "
                              "print(netns_problem('/proc/1/ns/net'))"],
                             capture_output=True, text=True, check=True, timeout=60)
        assert out.stdout.strip() != "None"
        assert "the host's network namespace" in out.stdout or "Permission denied" in out.stdout


def test_the_record_survives_a_restart_and_drops_what_vanished(tmp_path: Path) -> None:
    path = tmp_path / "sandboxes-n1.json"
    with netns_set(2) as (a, b):
        rec = SandboxRecord(str(path))
        rec.put(KEY, "cid-1", f"/var/run/netns/{a}")
        rec.put(("default", "r2"), "cid-2", f"/var/run/netns/{b}")
        again = SandboxRecord(str(path))
        assert again.netns_of(KEY, "cid-1") == f"/var/run/netns/{a}"
        assert again.netns_of(KEY, "cid-other") == ""  # another container: not vouched for
        # Vanished while the daemon was down: kept, so the reconciler sees it gone and clears the pod.
        ip("netns", "del", b)
        third = SandboxRecord(str(path))
        assert third.get(("default", "r2")) is not None and third.netns_of(("default", "r2"), "cid-2") == ""
        # Replaced by something that is not a network namespace: dropped, never trusted.
        Path(f"/var/run/netns/{b}").write_text("")
        try:
            logged: list[dict[str, object]] = []
            fourth = SandboxRecord(str(path), lambda **e: logged.append(e))
        finally:
            Path(f"/var/run/netns/{b}").unlink()
        assert fourth.get(("default", "r2")) is None
        assert any(e.get("event") == "sandbox-dropped" for e in logged)
        assert [p["pod"] for p in json.loads(path.read_text())["pods"]] == ["r1"]



def test_the_file_holds_every_pod_as_recorded_after_puts_replacements_and_drops(tmp_path: Path) -> None:
    """Each entry is encoded once and kept (the file is written on every ADD): what is written is
    still exactly the record, sorted, and what a restarted daemon reads back."""
    path = tmp_path / "sandboxes-n1.json"
    with netns_set(3) as (a, b, c):
        rec = SandboxRecord(str(path))
        for i, ns in enumerate((a, b, c)):
            rec.put(("default", f"r{3 - i}"), f"cid-{i}", f"/var/run/netns/{ns}")
        rec.put(("default", "r3"), "cid-new", f"/var/run/netns/{c}")  # the same pod, a new sandbox
        rec.drop(("default", "r2"))
        rec.put(("lab", "r0"), "cid-9", f"/var/run/netns/{b}")
        doc = json.loads(path.read_text())
        assert doc["version"] == 1
        assert [(p["namespace"], p["pod"], p["container_id"], p["netns"]) for p in doc["pods"]] == [
            ("default", "r1", "cid-2", f"/var/run/netns/{c}"), ("default", "r3", "cid-new", f"/var/run/netns/{c}"),
            ("lab", "r0", "cid-9", f"/var/run/netns/{b}")]
        again = SandboxRecord(str(path))
        for key in (("default", "r1"), ("default", "r3"), ("lab", "r0")):
            assert again.get(key) == rec.get(key)
        assert again.get(("default", "r2")) is None


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"version": 2, "pods": []}', '{"version": 1, "pods": {}}',
    '{"version": 1, "pods": [{"namespace": "default", "pod": "r1", "container_id": "c", '
    '"netns": "/proc/1/ns/net", "ino": 1}]}',
    '{"version": 1, "pods": [{"namespace": "default", "pod": "r1", "container_id": "c", '
    '"netns": "/proc/self/ns/net", "ino": "1"}]}',
    '{"version": 1, "pods": [{"namespace": "Bad Name", "pod": "r1", "container_id": "c", '
    '"netns": "/var/run/netns/x", "ino": 1}]}',
])
def test_a_forged_or_corrupt_record_file_is_not_trusted(tmp_path: Path, content: str) -> None:
    path = tmp_path / "sandboxes-n1.json"
    path.write_text(content)
    rec = SandboxRecord(str(path))
    assert rec.get(KEY) is None


def test_a_namespace_path_reused_for_another_namespace_is_not_the_pods(tmp_path: Path) -> None:
    with netns_set(1) as (a,):
        rec = SandboxRecord(str(tmp_path / "r.json"))
        rec.put(KEY, "cid-1", f"/var/run/netns/{a}")
        ip("netns", "del", a)
        ip("netns", "add", a)  # same name, another namespace
        assert rec.netns_of(KEY, "cid-1") == ""


def test_garbage_removes_only_interfaces_with_meshnets_mark() -> None:
    """Names the status records, vxlans with "our" VNIs: without the link group, never removed."""
    topo = Topology("r1", "default", (), TopologyStatus(links=(LinkStatus(1, "veth", "up", "", "eth0"),)))
    vxlan: dict[str, Any] = {"ifname": "vx", "linkinfo": {"info_kind": "vxlan",
                                          "info_data": {"id": naming.vni("default", 1)}}}
    view: dict[str, dict[str, Any]] = {"eth0": {"ifname": "eth0", "group": "default"}, "vx": vxlan,
            "eth1": {"ifname": "eth1", "group": str(naming.LINK_GROUP)}}
    assert [c.argv for c in kernel.garbage(topo, "ns", view)] == [("link", "del", "eth1")]
