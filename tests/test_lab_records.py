"""The lab's pod records in its state file (issue 14 item 5: a lab of 750 pods wrote ~0.5 MB of JSON
twice per ADD, one ADD after the other under the lab's lock): several concurrent changes share one
write (the kubelet's RecordWriter), only the records that changed are encoded again, and a change of
pod records only is appended to the file's change log instead of rewriting the file."""

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

    def append_changes(self, path: Path, pods: list[str], memo: dict[str, tuple[dict[str, Any], str]]) -> None:
        type(self).writes += 1
        time.sleep(0.05)
        super().append_changes(path, pods, memo)


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
        on_disk[rec.name] = LabState.load(names.state_path).pods[rec.name].state

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

    def broken(self: LabState, path: Path, *args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_SlowState, "save", broken)
    monkeypatch.setattr(_SlowState, "append_changes", broken)
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


def _plain_file(tmp_path: Path, pods: int) -> tuple[LabNames, StateFile]:
    names = LabNames("t", tmp_path / "t")
    file = StateFile(names)
    file.create(_state(pods))
    return names, file


def test_a_record_change_is_appended_not_written_whole_so_its_cost_does_not_grow_with_the_lab(
        tmp_path: Path) -> None:
    from meshnet.lab.state import changes_path

    written: dict[int, int] = {}
    for pods in (10, 750):
        names, file = _plain_file(tmp_path / str(pods), pods)
        whole = names.state_path.read_bytes()
        before = names.state_path.stat()
        with file.transaction() as st:
            st.pods["r3"].state, st.pods["r3"].links = "up", 2
        after = names.state_path.stat()
        # The file itself is untouched: the change went to the log beside it.
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert names.state_path.read_bytes() == whole
        written[pods] = changes_path(names.state_path).stat().st_size
        # Another process (a second StateFile) reads the change.
        other = StateFile(names).reload()
        assert other.pods["r3"].state == "up" and other.pods["r3"].links == 2 and other == file.state
    assert written[750] < 1.2 * written[10]  # one record's worth, whatever the lab's size


def test_the_change_log_is_folded_into_the_file_once_it_holds_as_many_records_as_the_lab_has_pods(
        tmp_path: Path) -> None:
    from meshnet.lab.state import changes_path

    names, file = _plain_file(tmp_path, 100)
    for i in range(100):
        with file.transaction() as st:
            st.pods[f"r{i}"].seconds = i + 0.5
        assert changes_path(names.state_path).exists()
    with file.transaction() as st:  # the 101st: the file written whole, the log gone
        st.pods["r0"].links = 7
    assert not changes_path(names.state_path).exists()
    raw = json.loads(names.state_path.read_text())
    assert raw["pods"]["r0"]["links"] == 7 and raw["pods"]["r99"]["seconds"] == 99.5
    # Anything but pod records (a daemon's pid) is written whole too.
    with file.transaction() as st:
        st.pods["r1"].links = 1
    with file.transaction() as st:
        st.daemons["node0"] = 4242
    assert not changes_path(names.state_path).exists()
    assert LabState.load(names.state_path) == file.state


def test_a_torn_append_is_left_out_and_the_file_written_whole_at_once(tmp_path: Path) -> None:
    from meshnet.lab.state import changes_path

    names, file = _plain_file(tmp_path, 4)
    with file.transaction() as st:
        st.pods["r1"].state = "up"
    log = changes_path(names.state_path)
    with log.open("a") as f:
        f.write('{"pod":"r2","record":{"name":"r2","nam')  # a process killed in its append
    other = StateFile(names)
    # Read and written whole at once: an append after the torn line would have been lost with it.
    assert other.reload().pods["r1"].state == "up" and other.state.pods["r2"].state == "new"
    assert not log.exists()
    with other.transaction() as st:
        st.pods["r2"].state = "adding"
    assert log.exists() and LabState.load(names.state_path).pods["r2"].state == "adding"


def test_a_damaged_change_log_is_refused_naming_the_file(tmp_path: Path) -> None:
    from meshnet.lab.state import changes_path

    names, file = _plain_file(tmp_path, 4)
    with file.transaction() as st:
        st.pods["r1"].state = "up"
    log = changes_path(names.state_path)
    log.write_text('{"pod":"r1"}\n' + log.read_text())
    with pytest.raises(LabError, match=r"state file .*state.json is damaged .*change log line 1"):
        StateFile(names).reload()


def test_the_kubelets_change_compares_only_its_own_pods_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Comparing every record with what was written cost 0.7 ms per change at 750 pods (the
    lab's size again): a RecordWriter's write names the pods of its batch."""
    names, file = _plain_file(tmp_path, 750)
    asked: list[list[str] | None] = []
    compare = LabState.changed_pods

    def spy(self: LabState, memo: Any, among: Any = None) -> list[str]:
        asked.append(None if among is None else list(among))
        return compare(self, memo, among)

    monkeypatch.setattr(LabState, "changed_pods", spy)
    assert RecordWriter(names, file).record("r7", {"state": "up", "links": 3}).state == "up"
    assert asked == [["r7"]]
    back = StateFile(names).reload().pods["r7"]
    assert (back.state, back.links) == ("up", 3)


def test_a_record_another_process_changed_and_this_one_changed_back_is_written(tmp_path: Path) -> None:
    names, a = _plain_file(tmp_path, 8)
    b = StateFile(names)  # another process
    with a.transaction(pods=["r1"]) as st:
        st.pods["r1"].state = "up"
    with b.transaction(pods=["r1"]) as st:
        st.pods["r1"].state = "down"
    with a.transaction(pods=["r1"]) as st:  # reads b's change, then sets what it had written before
        assert st.pods["r1"].state == "down"
        st.pods["r1"].state = "up"
    assert StateFile(names).reload().pods["r1"].state == "up"
