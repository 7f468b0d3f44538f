"""Invalid manifests (tests/bad/*.yml) are refused by the CLI, with the field named, and nothing is planned.

Each corpus file starts with comment lines saying what the refusal must name:
`# expect: FIELD`, `# object: KIND NAMESPACE/NAME` and, when the link has a usable uid, `# uid: N`.
The CLI runs in a subprocess, as an operator would run it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshnet.model import ManifestError, load_manifest

BAD = sorted((Path(__file__).parent / "bad").glob("*.yml"))
ROOT = Path(__file__).resolve().parent.parent


def expectations(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("# ") or ": " not in line:
            continue
        key, _, value = line[2:].partition(": ")
        if key in ("expect", "object", "uid"):
            out[key] = value
    assert "expect" in out and "object" in out, f"{path.name}: corpus file lacks its '# expect:'/'# object:' header"
    return out


def meshnetctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshnet.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=False)


def assert_named(stderr: str, path: Path) -> None:
    want = expectations(path)
    assert str(path) in stderr
    assert want["object"] in stderr, stderr
    assert f": {want['expect']}" in stderr, stderr
    if "uid" in want:
        assert f"link uid {want['uid']}:" in stderr, stderr
    assert "Traceback" not in stderr


def test_corpus_is_large_enough() -> None:
    assert len(BAD) >= 25


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_model_refuses(path: Path) -> None:
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert_named(str(e.value), path)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_validate_refuses(path: Path) -> None:
    r = meshnetctl("validate", str(path))
    assert r.returncode != 0
    assert r.stdout == ""
    assert f"{path}: invalid" in r.stderr
    assert_named(r.stderr, path)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_plan_refuses_and_prints_nothing(path: Path) -> None:
    r = meshnetctl("plan", str(path), "--nodes", "3", "--prefix", "mnt-bad-")
    assert r.returncode != 0
    assert r.stdout == ""  # no script at all: nothing could be replayed
    assert r.stderr.startswith("meshnetctl plan: ")
    assert_named(r.stderr, path)


def test_validate_reports_each_file_of_a_mix() -> None:
    good = ROOT / "tests" / "3node.yml"
    r = meshnetctl("validate", str(good), str(BAD[0]))
    assert r.returncode == 1
    assert r.stdout.startswith(f"{good}: ok (3 topologies, 3 pods, 6 link ends)")
    assert f"{BAD[0]}: invalid" in r.stderr


@pytest.mark.parametrize("prefix", ["mnd-;reboot-", "mnd- netns x", "$(reboot)", "-mnd"])
def test_plan_refuses_a_bad_prefix(prefix: str) -> None:
    r = meshnetctl("plan", str(ROOT / "tests" / "3node.yml"), "--prefix", prefix)
    assert r.returncode != 0 and r.stdout == ""
    assert "--prefix" in r.stderr


@pytest.mark.parametrize("nodes", ["0", "201"])
def test_plan_refuses_a_bad_node_count(nodes: str) -> None:
    r = meshnetctl("plan", str(ROOT / "tests" / "3node.yml"), "--nodes", nodes)
    assert r.returncode != 0 and r.stdout == "" and "--nodes" in r.stderr


def test_plan_of_a_missing_file() -> None:
    r = meshnetctl("plan", "tests/no-such-file.yml")
    assert r.returncode != 0 and r.stdout == "" and "cannot read" in r.stderr
