"""A bounded, seeded soak of self-healing: pod restarts, moves, daemon kills and topology edits in a
random (but reproducible: MESHNET_SOAK_SEED) order on 8 pods over 3 nodes. After every step the
kernel must match the store (`assert_converged`); at the end every link answers a ping, and tearing
the lab down must leave no namespace, process or file behind (`lab_up` asserts that).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.labkit import failed_pings, lab_up
from tests.test_selfheal import assert_converged, mesh_manifest, topologies, up_pods

pytestmark = [pytest.mark.root, pytest.mark.slow]

PODS = [f"s{i}" for i in range(8)]
# A ring plus two chords are always there; four more links come and go.
BASE = [(PODS[i], PODS[(i + 1) % 8]) for i in range(8)] + [("s0", "s4"), ("s2", "s6")]
OPTIONAL = {101: ("s1", "s5"), 102: ("s3", "s7"), 103: ("s0", "s2"), 104: ("s5", "s7")}
STEPS = 40
BUDGET = 100.0  # seconds for the steps; the whole test must stay under 2 minutes


def manifest(extra: set[int]) -> str:
    uids = [*range(1, len(BASE) + 1), *sorted(extra)]
    return mesh_manifest(PODS, [*BASE, *(OPTIONAL[u] for u in sorted(extra))], uids=uids)


def test_randomized_soak(tmp_path: Path) -> None:
    seed = int(os.environ.get("MESHNET_SOAK_SEED", "20240611"))
    rng = random.Random(seed)
    extra: set[int] = set()
    with lab_up(tmp_path, manifest(extra), nodes=3) as lab:
        assert_converged(lab)
        started = time.monotonic()
        history: list[str] = []
        for step in range(STEPS):
            op = rng.choice(["restart", "move", "daemon", "edit", "edit"])
            if op == "restart":
                pod = rng.choice(PODS)
                assert lab.restart_pod(pod).state == "up", lab.state.pods[pod].error
                what = f"restart {pod}"
            elif op == "move":
                pod = rng.choice(PODS)
                node = rng.choice([n for n in lab.state.nodes if n != lab.state.pods[pod].node])
                assert lab.restart_pod(pod, node=node).state == "up", lab.state.pods[pod].error
                what = f"move {pod} to {node}"
            elif op == "daemon":
                node = rng.choice(lab.state.nodes)
                lab.restart_daemon(node)
                what = f"kill -9 meshnetd on {node}"
            else:
                uid = rng.choice(sorted(OPTIONAL))
                extra ^= {uid}
                path = tmp_path / f"step{step}.yml"
                path.write_text(manifest(extra))
                lab.apply(str(path))
                what = f"{'add' if uid in extra else 'remove'} link {uid}"
            history.append(what)
            try:
                assert_converged(lab, timeout=5.0)
            except AssertionError as e:
                raise AssertionError(f"seed {seed}, after step {step} ({'; '.join(history)}): {e}") from e
            assert time.monotonic() - started < BUDGET, f"soak too slow: {history}"
        assert sorted(up_pods(lab)) == PODS
        assert failed_pings(lab) == [], f"seed {seed}: {history}"
        # Every desired link is recorded up exactly once per end in the store as well.
        links = len(BASE) + len(extra)
        assert sum(len(t.status.links) for t in topologies(lab).values()) == 2 * links
