"""The import contracts of `make lint` (pyproject.toml, [tool.importlinter]) hold, and can fail.

Each case runs `lint-imports` on a private copy of the package with one import added that the
design forbids, and expects the contract that names the rule to break. The clean copy passes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(tmp_path: Path, module: str = "", line: str = "") -> subprocess.CompletedProcess[str]:
    shutil.copy2(REPO / "pyproject.toml", tmp_path)
    shutil.copytree(REPO / "meshnet", tmp_path / "meshnet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if module:
        path = tmp_path / (module.replace(".", "/") + ".py")
        path.write_text(path.read_text() + f"\n{line}\n")
    # PYTHONPATH first: the copy, not this worktree's editable install, is the package analysed.
    # COLUMNS: rich would wrap a contract's name and its verdict onto two lines at 80.
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "300", "NO_COLOR": "1"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_package_keeps_its_contracts(tmp_path: Path) -> None:
    proc = _lint(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 kept, 0 broken" in proc.stdout, proc.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    # A lower layer reaching up.
    ("meshnet.naming", "from meshnet import plan", "Layers"),
    ("meshnet.store.sqlite", "from meshnet.daemon import config", "Layers"),
    # Two siblings of one layer.
    ("meshnet.standalone", "from meshnet.daemon import config", "Layers"),
    # A pure layer importing a runner, or something of a higher part.
    ("meshnet.plan", "import plumbum", "Pure layers"),
    ("meshnet.render", "import grpc", "Pure layers"),
    # The executor would import Jinja again.
    ("meshnet.executor", "from meshnet import render", "No Jinja where commands run"),
    # The shim, through the protocol module it imports, would load a third-party package.
    ("meshnet.cni.protocol", "import yaml", "CNI: standard library only"),
    ("meshnet.cni.shim", "from meshnet import plan", "The shim: meshnet's standard-library CNI modules"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    proc = _lint(tmp_path, module, line)
    assert proc.returncode != 0, proc.stdout
    broken = [ln for ln in proc.stdout.splitlines() if "BROKEN" in ln]
    assert any(contract in ln for ln in broken), proc.stdout
