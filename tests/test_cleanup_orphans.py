"""`make clean-netns` (scripts/cleanup) after a run killed mid-test: the labs its process claimed
(tests/owned.py) are taken down whole, containerd, sandboxes and all; records it cannot trust
are left alone."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests import owned
from tests.netns import list_netns

ROOT = Path(__file__).resolve().parent.parent


def load_cleanup() -> ModuleType:
    spec = importlib.util.spec_from_loader("cleanup", SourceFileLoader("cleanup", str(ROOT / "scripts" / "cleanup")))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cleanup() -> ModuleType:
    return load_cleanup()


def claim(**change: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"lab": "t1a2b3", "dir": "/tmp/mnlxyz/t1a2b3", "dirs": ["/tmp/mnlxyz"], "pid": 1,
                              "start": 0, "cgroups": ["/mnt-cri-0a1b2c"],
                              "netns": ["cni-0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"]}
    record.update(change)
    return record


def test_a_claim_as_the_suite_writes_it_is_read(cleanup: ModuleType) -> None:
    got = cleanup.parse_claim(claim())
    assert (got.lab, got.dirs, got.cgroups) == ("t1a2b3", ["/tmp/mnlxyz/t1a2b3", "/tmp/mnlxyz"], ["/mnt-cri-0a1b2c"])
    assert got.netns == ["cni-0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"]


@pytest.mark.parametrize(("change", "field"), [
    ({"lab": "../x"}, "lab"),
    ({"lab": "a" * 13}, "lab"),
    ({"dir": "/"}, "dir"),
    ({"dir": "/tmp"}, "dir"),
    ({"dir": "/tmp/"}, "dir"),
    ({"dir": "/home/user"}, "dir"),
    ({"dir": "/tmp/../etc"}, "dir"),
    ({"dirs": ["/run/meshnet"]}, "dir"),
    ({"dirs": ["/run/meshnet/labs"]}, "dir"),  # every lab's
    ({"dirs": ["/tmp/pytest-of-root/pytest-3"]}, "dir"),  # every test's of a run
    ({"dirs": "/tmp/x"}, "dir"),
    ({"cgroups": ["/system.slice"]}, "cgroups"),
    ({"cgroups": ["/mnt-cri-0a1b2c/../../init.scope"]}, "cgroups"),
    ({"netns": ["mnl-other-node0"]}, "netns"),
    ({"netns": "cni-0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"}, "netns"),
    ({"pid": "1"}, "pid"),
    ({"pid": True}, "pid"),
    ({"start": None}, "pid"),
], ids=["lab-path", "lab-long", "dir-root", "dir-tmp", "dir-tmp-slash", "dir-elsewhere", "dir-dotdot",
        "dirs-run-meshnet", "dirs-all-labs", "dirs-pytest-run",
        "dirs-not-list", "cgroup-system", "cgroup-dotdot", "netns-not-cni", "netns-not-list",
        "pid-string", "pid-bool", "start-missing"])
def test_a_claim_with_a_field_out_of_shape_is_refused_naming_it(cleanup: ModuleType, change: dict[str, Any],
                                                                field: str) -> None:
    with pytest.raises(cleanup.BadRecord, match=f"^{field}"):
        cleanup.parse_claim(claim(**change))


def test_records_that_are_not_roots_alone_are_left_alone(cleanup: ModuleType, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    owned_dir = tmp_path / "owned"
    owned_dir.mkdir(mode=0o700)
    monkeypatch.setattr(cleanup, "OWNED_DIR", owned_dir)
    record = owned_dir / "t1a2b3.json"
    record.write_text(json.dumps(claim(dir=str(tmp_path / "lab"), dirs=[])))
    record.chmod(0o666)  # anyone could have written it
    assert cleanup.reap_orphans(dry=False) == 1
    assert "not root's alone: left alone" in capsys.readouterr().err
    assert record.exists()
    owned_dir.chmod(0o777)
    record.chmod(0o600)
    assert cleanup.reap_orphans(dry=False) == 1
    assert "is not root's alone: its records are ignored" in capsys.readouterr().err
    assert record.exists()


KILLED_RUN = """
import json, sys, time
from tests.crikit import cri_cluster
from tests.test_offline_lab import MANIFEST  # r1 -- r2 (its other documents are not Topologies)
with cri_cluster(MANIFEST, nodes=1) as cluster:
    cluster.set_mode("chain")
    sbs = [cluster.run_pod(p, node="node0") for p in ("r1", "r2")]
    print(json.dumps({"lab": cluster.lab.name, "root": str(cluster.root), "cgroup": cluster.cgroup_parent,
                      "netns": [sb.netns for sb in sbs]}), flush=True)
    time.sleep(600)
"""


@pytest.fixture
def killed_run() -> Iterator[dict[str, Any]]:
    """A process that set up a CRI cluster with two sandboxes, killed with SIGKILL (no teardown)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_RUN)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the run did not set up (rc {proc.wait(timeout=60)})"
        run = json.loads(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        load_cleanup().reap_orphans(dry=False)  # a failed test leaves nothing either


@pytest.mark.root
@pytest.mark.slow
def test_clean_netns_reaps_what_a_killed_cri_run_left(killed_run: dict[str, Any], cleanup: ModuleType,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    lab, root = killed_run["lab"], killed_run["root"]
    lab_dir = f"{root}/{lab}"
    record = owned.OWNED_DIR / f"{lab}.json"

    def left() -> dict[str, Any]:
        return {
            "processes": cleanup.processes_mentioning([root], f"mnl-{lab}-"),
            "namespaces": sorted(n for n in list_netns() if n.startswith(f"mnl-{lab}-") or n in killed_run["netns"]),
            "cgroup": bool(cleanup._cgroup_dirs(killed_run["cgroup"])),  # in every hierarchy (v1) or the one
            "dirs": [d for d in (root, lab_dir) if os.path.lexists(d)],
            "record": record.exists(),
        }

    before = left()
    # What the killed run left: its lab's meshnetd and containerd (and shims), the lab's and the
    # sandboxes' namespaces, the sandboxes' cgroup, its directories and its claim.
    assert len(before["processes"]) >= 2 and before["cgroup"] and before["record"], before
    assert set(killed_run["netns"]) <= set(before["namespaces"]) and f"mnl-{lab}-node0" in before["namespaces"]
    cmdlines = " ".join(Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace") for p in before["processes"])
    assert "meshnet.daemon.main" in cmdlines and "containerd" in cmdlines

    assert cleanup.reap_orphans(dry=True) == 0
    assert f"would reap lab {lab} (its owner" in capsys.readouterr().out
    assert left() == before  # a dry run touches nothing
    assert cleanup.reap_orphans(dry=False) == 0
    assert f"reaped lab {lab} (its owner" in capsys.readouterr().out
    assert left() == {"processes": [], "namespaces": [], "cgroup": False, "dirs": [], "record": False}
