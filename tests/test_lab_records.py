"""The lab's pod records in its state file (issue 14 item 5: a lab of 750 pods wrote ~0.5 MB of JSON
twice per ADD, one ADD after the other under the lab's lock): several concurrent changes share one
write (the kubelet's RecordWriter), and only the records that changed are encoded again."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meshnet.lab.kubelet import RecordWriter
from meshnet.lab.state import LabError, LabNames, LabState, PodRecord, StateFile


def _state(pods: int) -> LabState:
    st = LabState("t", "/nowhere.yml", ["node0", "node1"], "sqlite:///nowhere", ["meshnet"])
    st.pods = {f"r{i}": PodRecord(f"r{i}", "default", f"node{i % 2}", f"mnl-t-r{i}",
                                  result={"interfaces": [{"name": "eth0", "sandbox": f"/run/netns/mnl-t-r{i}"}]})
               for i in range(pods)}
    return st


def test_a_save_with_the_memo_writes_what_a_save_without_it_writes(tmp_path: Path) -> None:
    st = _state(20)
    plain, memoised = tmp_path / "plain.json", tmp_path / "memo.json"
    memo: dict[str, tuple[dict[str, Any], str]] = {}
    st.save(plain)
    st.save(memoised, memo)
    assert json.loads(memoised.read_text()) == json.loads(plain.read_text())
    assert set(memo) == set(st.pods)
    # A field replaced (as every writer does) is encoded again; the others come from the memo.
    st.pods["r3"].state, st.pods["r3"].result = "up", {"interfaces": [], "cniVersion": "1.0.0"}
    st.pods["r4"].container_id = "c" * 64
    kept = {k: v for k, v in memo.items() if k not in ("r3", "r4")}
    st.save(plain)
    st.save(memoised, memo)
    assert json.loads(memoised.read_text()) == json.loads(plain.read_text())
    assert all(memo[k] is v for k, v in kept.items())
    back = LabState.load(memoised)
    assert back.pods["r3"].state == "up" and back.pods["r3"].result["cniVersion"] == "1.0.0"
    assert back.pods["r4"].container_id == "c" * 64 and back == st


def test_a_lab_state_with_no_pods_saves_and_loads(tmp_path: Path) -> None:
    st = _state(0)
    st.save(tmp_path / "s.json", {})
    assert LabState.load(tmp_path / "s.json") == st


class _SlowState(LabState):
    """A state file that takes 50 ms to write, counting its writes."""

    writes = 0

    def save(self, path: Path, memo: dict[str, tuple[dict[str, Any], str]] | None = None) -> None:
        type(self).writes += 1
        time.sleep(0.05)
        super().save(path, memo)


def _slow_file(tmp_path: Path, pods: int) -> tuple[LabNames, StateFile]:
    names = LabNames("t", tmp_path / "t")
    file = StateFile(names)
    base = _state(pods)
    _SlowState.writes = 0
    file.create(_SlowState(**vars(base)))
    return names, file


def test_concurrent_changes_share_writes_and_each_caller_returns_once_its_change_is_in_the_file(
        tmp_path: Path) -> None:
    names, file = _slow_file(tmp_path, 16)
    writer = RecordWriter(names, file)
    start = threading.Barrier(16)
    got: dict[str, PodRecord] = {}
    on_disk: dict[str, str] = {}

    def change(i: int) -> None:
        start.wait()
        rec = writer.record(f"r{i}", {"state": "up", "links": i})
        got[rec.name] = rec
        # What the caller was given is already in the file (read by another reader, not the copy).
        on_disk[rec.name] = json.loads(names.state_path.read_text())["pods"][rec.name]["state"]

    threads = [threading.Thread(target=change, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(f"r{i}" for i in range(16))
    assert all(got[f"r{i}"].links == i and got[f"r{i}"].state == "up" for i in range(16))
    assert set(on_disk.values()) == {"up"}
    # 16 changes arrived while a 50 ms write was under way: far fewer writes than changes.
    assert writer.transactions == _SlowState.writes - 1  # the create was a write too
    assert writer.transactions <= 4
    final = LabState.load(names.state_path)
    assert all(final.pods[f"r{i}"].links == i for i in range(16))


def test_a_change_to_a_missing_pod_fails_alone(tmp_path: Path) -> None:
    names, file = _slow_file(tmp_path, 4)
    writer = RecordWriter(names, file)
    start = threading.Barrier(3)
    errors: dict[str, Exception] = {}

    def change(pod: str) -> None:
        start.wait()
        try:
            writer.record(pod, {"state": "up"})
        except LabError as e:
            errors[pod] = e

    threads = [threading.Thread(target=change, args=(p,)) for p in ("r1", "ghost", "r2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert list(errors) == ["ghost"] and "no pod 'ghost' in lab t" in str(errors["ghost"])
    final = LabState.load(names.state_path)
    assert final.pods["r1"].state == "up" and final.pods["r2"].state == "up"


def test_a_failed_write_fails_every_change_it_carried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names, file = _slow_file(tmp_path, 2)
    writer = RecordWriter(names, file)

    def broken(self: LabState, path: Path, memo: Any = None) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_SlowState, "save", broken)
    with pytest.raises(OSError, match="No space left"):
        writer.record("r1", {"state": "up"})
    monkeypatch.undo()
    assert writer.record("r1", {"state": "down"}).state == "down"  # the writer is not wedged


@pytest.mark.root
def test_a_sandbox_is_a_named_namespace_with_lo_up() -> None:
    """The kubelet's sandbox (lo brought up in-process, not by a second `ip`): lo is UP, the
    machine's own lo is untouched, and nothing else is in the namespace."""
    import subprocess

    from meshnet.executor import Executor
    from meshnet.lab.kubelet import make_sandbox

    netns = "mnt-d3-sandbox"
    subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
    try:
        make_sandbox(Executor(), netns)
        links = json.loads(subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True,
                                          text=True, check=True).stdout)
        assert [(lk["ifname"], "UP" in lk["flags"]) for lk in links] == [("lo", True)]
        addrs = json.loads(subprocess.run(["ip", "-n", netns, "-j", "addr", "show", "dev", "lo"],
                                          capture_output=True, text=True, check=True).stdout)
        assert {a["local"] for a in addrs[0]["addr_info"]} >= {"127.0.0.1"}  # lo really up: addresses
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
