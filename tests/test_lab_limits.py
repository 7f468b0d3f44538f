"""A big lab's limits, checked before bring-up: a node's pod network, the kernel's neighbour table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshnet.lab import limits
from meshnet.lab.cluster import Lab
from meshnet.lab.kubelet import POD_SUBNET
from meshnet.lab.state import LabError
from meshnet.model import parse_manifest
from meshnet.topo.builder import build, render


def fake_proc(tmp_path: Path, values: dict[str, int]) -> Path:
    proc = tmp_path / "proc"
    for family in limits.FAMILIES:
        d = proc / "net" / family / "neigh" / "default"
        d.mkdir(parents=True)
        for key, value in values.items():
            (d / key).write_text(f"{value}\n")
    return proc


def read(proc: Path, family: str = "ipv4") -> dict[str, int]:
    return limits.read_limits(proc)[family]


DEFAULTS = {"gc_thresh1": 128, "gc_thresh2": 512, "gc_thresh3": 1024}


def test_a_node_holds_253_pods_and_more_is_refused_naming_nodes() -> None:
    assert limits.pod_capacity(POD_SUBNET) == 253
    limits.check_pod_capacity({"node0": 253, "node1": 253}, 2, POD_SUBNET)
    with pytest.raises(LabError, match=r"--nodes: 2 node\(s\) put 254 pods on node1.*use --nodes 3 or more"):
        limits.check_pod_capacity({"node0": 253, "node1": 254}, 2, POD_SUBNET)


def test_lab_up_refuses_an_overfull_node_before_making_anything(tmp_path: Path) -> None:
    manifest = tmp_path / "big.yml"
    manifest.write_text(render(build(254, 253, seed=1)))
    lab = Lab("mntcap", root=tmp_path)
    with pytest.raises(LabError, match="--nodes: 1 node"):
        lab.up(str(manifest), 1)
    assert not lab.exists() and not lab.dir.exists()


def test_neighbour_entries_count_addressed_ends_and_eth0s() -> None:
    m = parse_manifest(render(build(10, 12, seed=3)))
    ends = sum(1 for t in m.topologies for lnk in t.links if lnk.local_ip is not None)
    assert ends == 24
    assert limits.neigh_entries(m) == 2 * 24 + 2 * 10


def test_warns_only_past_gc_thresh3_and_says_how_to_raise(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, DEFAULTS)
    assert limits.neigh_warning(1024, proc) is None
    text = limits.neigh_warning(5100, proc)
    assert text is not None
    assert "holds 1024" in text and "net.ipv4.neigh.default.gc_thresh3=10200" in text
    assert "--raise-neigh-limits" in text


def test_raised_for_the_lab_and_restored_by_down(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, DEFAULTS)
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    limits.raise_limits(lab_dir, 5100, proc)
    assert read(proc) == read(proc, "ipv6") == {"gc_thresh1": 2550, "gc_thresh2": 5100, "gc_thresh3": 10200}
    assert limits.restore_limits(lab_dir, proc) == []
    assert read(proc) == read(proc, "ipv6") == DEFAULTS


def test_never_lowered_and_a_value_changed_since_is_left(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {"gc_thresh1": 128, "gc_thresh2": 512, "gc_thresh3": 50000})
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    limits.raise_limits(lab_dir, 5100, proc)
    assert read(proc)["gc_thresh3"] == 50000
    (proc / "net/ipv4/neigh/default/gc_thresh2").write_text("7777\n")  # someone else, meanwhile
    problems = limits.restore_limits(lab_dir, proc)
    assert len(problems) == 1 and "gc_thresh2 is 7777" in problems[0]
    assert read(proc) == {"gc_thresh1": 128, "gc_thresh2": 7777, "gc_thresh3": 50000}
    assert read(proc, "ipv6") == {"gc_thresh1": 128, "gc_thresh2": 512, "gc_thresh3": 50000}


def test_a_tampered_record_restores_nothing_and_says_so(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, DEFAULTS)
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    (lab_dir / limits.SAVED).write_text(json.dumps({"old": {"ipv4": {"gc_thresh3": "1; reboot"}}, "set": {}}))
    problems = limits.restore_limits(lab_dir, proc)
    assert len(problems) == 1 and "cannot restore" in problems[0]
    assert read(proc) == DEFAULTS
    assert limits.restore_limits(tmp_path / "no-lab", proc) == []
