"""No pod's trouble blocks another (issue 13, item 5): a pod whose pass raises does not stop the pass
for the rest and is retried; an adoption and the runtime's DEL of the same sandbox never interleave;
the bind mount meshnetd made for a sandbox that vanished is released."""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from meshnet import naming
from meshnet.cni import offline
from meshnet.daemon import netns
from meshnet.daemon.topo_index import TopologyIndex
from meshnet.model import Link, Topology
from tests.test_daemon_core import NS, Node, kernel, node, paper, set_alive, store  # noqa: F401 - fixtures

# --- one failing pod in a pass ----------------------------------------------------------------------


def test_a_pod_whose_pass_raises_does_not_stop_the_others(node: Node, paper: Any,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    db = node.core.state.store
    set_alive(db, "a", "node0", "198.51.100.1", paper.make("ns-a"), "ca", here=node.core)
    set_alive(db, "b", "node0", "198.51.100.1", paper.make("ns-b"), "cb", here=node.core)
    reconciler = node.core.reconciler
    real = reconciler.reconcile_pod
    seen: list[str] = []
    logged: list[dict[str, Any]] = []
    monkeypatch.setattr(node.core.state, "log", lambda **e: logged.append(e))

    def flaky(topo: Topology, ns_topologies: Any) -> int:
        seen.append(topo.name)
        if topo.name == "a":
            raise RuntimeError("a's sandbox is in trouble")
        return real(topo, ns_topologies)

    monkeypatch.setattr(reconciler, "reconcile_pod", flaky)
    node.core.reconcile()
    assert seen == ["a", "b"]  # a is listed first: b's pass still ran
    b = db.get(NS, "b")
    assert b is not None and {s.uid: s.state for s in b.status.links} == {1: "up"}  # b was reconciled
    assert [e for e in logged if e["event"] == "reconcile-pod-error"] == [
        {"event": "reconcile-pod-error", "pod": "default/a", "error": "RuntimeError: a's sandbox is in trouble"}]
    # a is looked at again at the loop's next turn (and only then).
    assert (NS, "a") in node.core.take_retries()
    assert (NS, "a") not in node.core.take_retries()


# --- an adoption and the runtime's DEL of the same sandbox ------------------------------------------


def _env(command: str, pod: str, cid: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/x", "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"K8S_POD_NAMESPACE=lab;K8S_POD_NAME={pod}"}


def test_a_del_during_an_adoption_waits_for_it_and_an_adoption_after_a_del_does_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "topo.json")
    sandbox = tmp_path / "netns-r1"
    sandbox.touch()
    offline.write_record(path, offline.Record("cid1", "lab", "r1", str(sandbox), "eth0"))
    calls: list[str] = []
    adding, release = threading.Event(), threading.Event()

    def handle(command: str, env: Mapping[str, str], stdin: str) -> None:
        calls.append(f"{command} start")
        if command == "ADD":
            adding.set()
            assert release.wait(10)
        calls.append(f"{command} end")

    index = TopologyIndex(path, handle, lambda **e: None)
    index.load_records()
    topo = Topology("r1", "lab", (Link(1, "r2", "eth1", "eth1"),))
    adoption = threading.Thread(target=index.adopt, args=([topo],))
    deleting = threading.Thread(target=index.wrap(handle), args=("DEL", _env("DEL", "r1", "cid1"), ""))
    adoption.start()
    try:
        assert adding.wait(10)
        deleting.start()  # the runtime's DEL of the sandbox being adopted, really at the same time
        time.sleep(0.3)
        assert calls == ["ADD start"], "the DEL ran while the adoption's ADD was half-way"
    finally:
        release.set()
        adoption.join(10)
        if deleting.ident is not None:
            deleting.join(10)
    assert calls == ["ADD start", "ADD end", "DEL start", "DEL end"]
    # The record is gone with the DEL: a later adoption (the next event or refresh) does nothing.
    calls.clear()
    offline.write_record(path, offline.Record("cid2", "lab", "r1", str(sandbox), "eth0"))
    index.load_records()
    index.wrap(handle)("DEL", _env("DEL", "r1", "cid2"), "")
    index.adopt([topo])
    assert calls == ["DEL start", "DEL end"]


# --- the bind mount of a vanished sandbox ------------------------------------------------------------


@pytest.mark.root
def test_the_mount_of_a_vanished_sandbox_is_released(tmp_path: Path) -> None:
    name = f"mnt-rel-{secrets.token_hex(3)}"
    runtime_path = tmp_path / "sandbox-netns"  # a runtime's own path, not under /var/run/netns
    attached = netns.NETNS_DIR / naming.attached_netns_name(str(runtime_path))
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        runtime_path.touch()
        subprocess.run(["mount", "--bind", str(netns.NETNS_DIR / name), str(runtime_path)], check=True)
        assert netns.resolve(str(runtime_path)) == attached.name
        assert os.path.ismount(attached)
        assert not netns.release(str(runtime_path))  # still there: kept
        subprocess.run(["umount", str(runtime_path)], check=True)
        runtime_path.unlink()  # the runtime removed the sandbox without a DEL
        assert netns.release(str(runtime_path))
        assert not attached.exists()
        assert not netns.release(str(runtime_path))  # once
        assert not netns.release(str(netns.NETNS_DIR / f"{name}-gone"))  # a runtime-named path: never ours
    finally:
        subprocess.run(["umount", str(runtime_path)], check=False, capture_output=True)
        netns.detach(attached.name)
        subprocess.run(["ip", "netns", "del", name], check=False)
