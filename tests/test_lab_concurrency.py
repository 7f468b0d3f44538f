"""The lab driven by several `meshnetctl lab` processes at once (issue 13, item 4): nothing is lost or
orphaned, one meshnetd per node, `down` removes everything even with a damaged or missing state file,
`apply` sees an edit made in place, and a pod restarted while its node's meshnetd restarts comes up
after the kubelet's retries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meshnet.lab.cluster import Lab
from meshnet.lab.state import LabState
from tests.labkit import failed_pings, lab_leftovers, lab_up

pytestmark = [pytest.mark.root, pytest.mark.slow]

TESTS = Path(__file__).parent
MESHNETCTL = str(Path(sys.executable).parent / "meshnetctl")


def meshnetds(lab: Lab) -> dict[str, list[int]]:
    """Every live meshnetd of the lab by node, from /proc (not from the lab's own bookkeeping)."""
    found: dict[str, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
            zombie = (proc / "stat").read_text().split(") ", 1)[1][:1] == "Z"
        except OSError:
            continue
        if "meshnet.daemon.main" in argv and not zombie:
            sock = Path(argv[argv.index("--socket") + 1])
            if sock.parent == lab.dir:
                found.setdefault(sock.stem, []).append(int(proc.name))
    return found


def converged(lab: Lab, timeout: float = 60.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        bad = failed_pings(lab)
        if not bad or time.monotonic() > deadline:
            return bad
        time.sleep(1.0)


def test_concurrent_pod_and_daemon_restarts_from_separate_processes(tmp_path: Path) -> None:
    with lab_up(tmp_path, TESTS / "3node.yml", nodes=3) as lab:
        env = {**os.environ, "MESHNET_LAB_ROOT": str(lab.dir.parent)}

        def ctl(*args: str) -> list[str]:
            words = 2  # `--name` after `pod restart` / `daemon restart`
            return [MESHNETCTL, "lab", *args[:words], "--name", lab.name, *args[words:]]

        commands = [ctl("pod", "restart", pod) for pod in lab.state.pods]
        commands += [ctl("daemon", "restart", node) for node in ("node0", "node1", "node1", "node2")]
        commands += [ctl("pod", "restart", "r1", "--node", "node2")]
        # Started together: really concurrent, each its own process (as users in several shells).
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
        outcomes = [(c, p.wait(timeout=240), *p.communicate()) for c, p in zip(commands, procs, strict=True)]
        failed = [(" ".join(c[2:]), rc, err[-600:]) for c, rc, _out, err in outcomes if rc != 0]
        assert failed == []

        # One meshnetd per node, each the one the state file records.
        daemons = meshnetds(lab)
        assert {n: len(p) for n, p in daemons.items()} == {"node0": 1, "node1": 1, "node2": 1}, daemons
        raw = json.loads(lab.state_path.read_text())  # valid JSON: no write was torn or lost
        assert {n: raw["daemons"][n] for n in daemons} == {n: p[0] for n, p in daemons.items()}
        # The pods' records as any reader finds them: the file with its change log replayed.
        final = LabState.load(lab.state_path)
        assert {name: rec.state for name, rec in final.pods.items()} == {"r1": "up", "r2": "up", "r3": "up"}
        assert final.pods["r1"].node == "node2"
        lab.file.reload()
        assert converged(lab) == []


def _damage(lab: Lab, how: str) -> None:
    if how == "damaged":
        lab.state_path.write_text("{}{}")  # what two writers at once used to leave
    else:
        lab.state_path.unlink()


@pytest.mark.parametrize("how", ["damaged", "missing"])
def test_down_removes_everything_without_a_usable_state_file(tmp_path: Path, how: str) -> None:
    with lab_up(tmp_path, TESTS / "3node.yml", nodes=2) as lab:
        _damage(lab, how)
        problems = Lab(lab.name, root=lab.dir.parent).down()  # a later process: nothing cached
        assert lab_leftovers(lab) == []
        if how == "damaged":
            assert len(problems) == 1 and "state file" in problems[0] and "damaged" in problems[0], problems
        else:
            assert problems == []


def test_down_with_dead_daemons_removes_everything(tmp_path: Path) -> None:
    """Daemons killed (no DEL could be served): `down` still removes every namespace and link."""
    with lab_up(tmp_path, TESTS / "3node.yml", nodes=2) as lab:
        netns = [rec.netns for rec in lab.state.pods.values()]
        for pid in list(lab.state.daemons.values()):
            os.kill(pid, signal.SIGKILL)
        problems = Lab(lab.name, root=lab.dir.parent).down()
        assert problems == []
        assert lab_leftovers(lab) == []
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert not [ns for ns in netns if ns in listed]


def test_down_resets_the_pods_status_in_a_kube_store(tmp_path: Path, kube_api: Any) -> None:
    """The kube store outlives the lab: each pod's Topology status is emptied, as its DEL would."""
    with lab_up(tmp_path, TESTS / "3node.yml", nodes=2, store="kube", kubeconfig=kube_api.kubeconfig) as lab:
        names = list(lab.state.pods)
        assert all(kube_api.get_object("topologies", "default", n)["status"].get("container_id") for n in names
                   if kube_api.get_object("topologies", "default", n) is not None)
        assert lab.down() == []
        assert lab_leftovers(lab) == []
    for n in names:
        topo = kube_api.get_object("topologies", "default", n)
        assert topo is None or not (topo.get("status") or {}).get("container_id"), (n, topo.get("status"))


def test_down_from_the_cli_with_a_damaged_state_file(tmp_path: Path) -> None:
    with lab_up(tmp_path, TESTS / "3node.yml", nodes=1) as lab:
        _damage(lab, "damaged")
        env = {**os.environ, "MESHNET_LAB_ROOT": str(lab.dir.parent)}
        proc = subprocess.run([MESHNETCTL, "lab", "down", "--name", lab.name], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "damaged" in proc.stderr
        assert lab_leftovers(lab) == []


def test_apply_after_editing_the_file_in_place(tmp_path: Path) -> None:
    manifest = tmp_path / "lab.yml"
    manifest.write_text((TESTS / "3node.yml").read_text())
    with lab_up(tmp_path, manifest, nodes=2) as lab:
        text = manifest.read_text()
        assert "12.12.12.1/24" in text
        manifest.write_text(text.replace("12.12.12.1/24", "12.12.99.1/24"))  # the same file, edited
        result = lab.apply(str(manifest))
        assert sorted(result["changed"]) == ["r1", "r2"], result
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            addrs = {a["local"] for a in lab.kernel_links(lab.pod_netns("r1"))["eth1"].get("addr_info", [])}
            if "12.12.99.1" in addrs:
                break
            time.sleep(0.2)
        assert "12.12.99.1" in addrs and "12.12.12.1" not in addrs, addrs
        assert lab.apply(str(manifest)) == {"changed": [], "removed": [], "pods_added": [], "pods_removed": []}


def test_a_pod_restart_during_a_daemon_restart_succeeds_after_retries(tmp_path: Path) -> None:
    with lab_up(tmp_path, TESTS / "3node.yml", nodes=1) as lab:
        said: list[str] = []
        lab.kubelet._progress = said.append
        lab.stop_daemon("node0", signal.SIGKILL)
        back = threading.Timer(1.5, lambda: lab.start_daemon("node0"))
        back.start()
        try:
            rec = lab.restart_pod("r2")
        finally:
            back.join()
        assert rec.state == "up", rec.error
        retries = [m for m in said if m.startswith("r2: CNI error 11") and "retrying in" in m]
        assert retries, said
        lab.wait_daemon("node0")
        assert converged(lab) == []
