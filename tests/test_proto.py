"""The committed gRPC modules are what `make proto` makes from meshnet.proto today.

The recipe is read from the Makefile and replayed with the outputs redirected into a temporary
directory, so a changed .proto, a changed recipe or a hand-edited module all show up here.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = "meshnet/proto"
GENERATED = ("meshnet_pb2.py", "meshnet_pb2.pyi", "meshnet_pb2_grpc.py")


def proto_recipe() -> list[str]:
    """The shell lines of the Makefile's `proto` target."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("proto:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def replay(recipe: list[str], out: Path) -> None:
    for line in recipe:
        line = line.replace("$(PY)", shlex.quote(sys.executable))
        line = line.replace(f"_out={PROTO_DIR}", f"_out={out}")
        for name in GENERATED:
            line = line.replace(f"{PROTO_DIR}/{name}", str(out / name))
        assert "$(" not in line, f"unexpected make variable in the proto recipe: {line}"
        argv = shlex.split(line)
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=120)


def test_recipe_generates_every_committed_module_and_fixes_the_import() -> None:
    recipe = proto_recipe()
    assert any("grpc_tools.protoc" in line for line in recipe)
    assert any(line.startswith("sed ") for line in recipe), "the generated grpc module needs its import fixed"
    for name in GENERATED:
        assert (ROOT / PROTO_DIR / name).exists(), f"{PROTO_DIR}/{name} is not committed"


@pytest.mark.parametrize("name", GENERATED)
def test_generated_modules_are_fresh(tmp_path: Path, name: str) -> None:
    replay(proto_recipe(), tmp_path)
    fresh = (tmp_path / name).read_text()
    committed = (ROOT / PROTO_DIR / name).read_text()
    assert committed == fresh, f"{PROTO_DIR}/{name} is stale or edited by hand: run `make proto`"


def test_grpc_module_imports_the_package_module() -> None:
    text = (ROOT / PROTO_DIR / "meshnet_pb2_grpc.py").read_text()
    assert "from meshnet.proto import meshnet_pb2 as" in text
    assert "\nimport meshnet_pb2" not in text
