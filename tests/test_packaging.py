"""The wheel carries the link templates: installed anywhere, it renders with no environment set.

The daemon image installs meshnet with pip, so a template left out of the package data would only
show as a failed pod start on a cluster. Build the wheel from a copy of the sources (pip builds in
the source tree, and this one is shared with other test runs), install it into a private target
and render a manifest from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from meshnet.render import ACTIONS, KINDS

REPO = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    shutil.copytree(REPO / "meshnet", src / "meshnet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # --no-build-isolation: build with this venv's setuptools, offline.
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(root / "out"),
                    str(src)], check=True, capture_output=True, text=True, timeout=300)
    (built,) = (root / "out").glob("meshnet-*.whl")
    return built


def test_wheel_holds_every_template(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"meshnet/templates/{kind}/{action}.j2" for kind in KINDS for action in ACTIONS}
    wanted.add("meshnet/templates/_macros.j2")
    assert wanted <= names, sorted(wanted - names)


def test_installed_wheel_renders_without_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([*PIP, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    # -I: no PYTHONPATH, no user site, not the current directory. The target goes first on the path,
    # ahead of the editable install of this worktree; the repository goes last, for tests.golden_gen
    # (the recipe of the golden files) only; the dependencies come from the venv.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2]); "
        "import meshnet.render; "
        "assert meshnet.render.__file__.startswith(sys.argv[1]), meshnet.render.__file__; "
        "from tests.golden_gen import golden_text; from pathlib import Path; "
        "print(golden_text(Path(sys.argv[3]), 3, 'add'), end='')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHNET")}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, str(site), str(REPO), str(REPO / "tests" / "3node.yml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (REPO / "tests" / "golden" / "3node-n3-add.txt").read_text()
