"""meshnetctl plan: refusals that name the problem, and well-behaved output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshnet.cli import main
from meshnet.dryrun import PlanError, layout_for
from meshnet.model import parse_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("pod", ["ul", "ext", "node0", "node2"])
def test_a_pod_named_like_the_emulated_cluster_is_refused(pod: str) -> None:
    manifest = parse_manifest(f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n")
    with pytest.raises(PlanError, match=f"pod default/{pod}: its namespace mnd-{pod} is one the emulated"):
        layout_for(manifest, 3, "mnd-")


def test_plan_refusal_is_one_line_and_exit_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ul.yml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata:\n  name: ul\n")
    assert main(["plan", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("meshnetctl plan: pod default/ul")


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`meshnetctl plan FILE | head -1` must not print a BrokenPipe traceback."""
    plan = subprocess.Popen([sys.executable, "-m", "meshnet.cli", "plan", "tests/5node.yml", "--nodes", "3"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert plan.stdout is not None and plan.stderr is not None
    head = subprocess.run(["head", "-1"], stdin=plan.stdout, capture_output=True, text=True, check=True)
    plan.stdout.close()  # as a shell does: `head` is the only reader left
    err = plan.stderr.read().decode()
    plan.stderr.close()
    plan.wait(timeout=30)
    assert head.stdout == "#!/bin/sh\n"
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_main_leaves_the_callers_signal_handling_alone(tmp_path: Path) -> None:
    """Only the `meshnetctl` program resets SIGPIPE; a caller of main() (this test runner) keeps its own."""
    import signal

    before = signal.getsignal(signal.SIGPIPE)
    assert main(["plan", str(ROOT / "tests" / "3node.yml")]) == 0
    assert signal.getsignal(signal.SIGPIPE) == before
