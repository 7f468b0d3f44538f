"""The per-phase timing of a CNI call (MESHNET_TIMING=1): off, it records and logs nothing."""

from __future__ import annotations

import time

import pytest

from meshnet.daemon import phases


def test_off_by_default_logs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phases, "ENABLED", False)
    logged: list[dict[str, object]] = []
    p = phases.start()
    p.mark("store get")
    assert phases.current() is p
    phases.finish(p, lambda **e: logged.append(e))
    assert logged == [] and p.marks == []


def test_on_logs_each_phase_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phases, "ENABLED", True)
    logged: list[dict[str, object]] = []
    p = phases.start()
    time.sleep(0.01)
    p.mark("store get")
    phases.current().mark("ip (executor)")  # code deeper down marks through the thread's recorder
    time.sleep(0.005)
    p.mark("store get")  # a phase met twice adds up
    phases.finish(p, lambda **e: logged.append(e), verb="ADD")
    assert len(logged) == 1
    event = logged[0]
    assert event["event"] == "timing" and event["verb"] == "ADD"
    got = event["phases"]
    assert isinstance(got, dict)
    assert set(got) == {"store get", "ip (executor)", "other"}
    assert got["store get"] >= 15.0
    assert float(event["total_ms"]) >= got["store get"]  # type: ignore[arg-type]
    assert not phases.current().marks  # the thread's recorder is reset: the next call starts clean
