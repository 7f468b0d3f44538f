"""The front door's package lists: `make demo` installs the lab's packages, `make test` all of them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB = {"iproute2", "iputils-ping", "containernetworking-plugins", "sqlite3", "kmod"}
HEAVY = {"chromium", "podman", "runc", "busybox-static", "gcc", "patchelf", "containerd"}


def _packages(target: str) -> set[str]:
    """The packages a deps target checks for, as make would run it (-n: nothing is installed)."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, check=True).stdout
    found = re.search(r"for p in ([^;]+); do dpkg -s", out)
    assert found, out
    return set(found.group(1).split())


def _prerequisites(target: str) -> list[str]:
    out = subprocess.run(["make", "-pn", "-C", str(ROOT), "help"], capture_output=True, text=True, check=False).stdout
    found = re.search(rf"^{target}:(.*)$", out, re.MULTILINE)
    assert found, target
    return found.group(1).split()


def test_demo_installs_the_lab_packages_and_nothing_heavy() -> None:
    assert _packages("deps-lab") == LAB
    assert "deps-lab" in _prerequisites("demo") and "venv" in _prerequisites("demo")


def test_test_installs_every_package_the_suite_drives() -> None:
    assert _packages("deps") == LAB | HEAVY
    assert _prerequisites("test") == ["setup"]
    assert _prerequisites("setup") == ["deps", "venv"]
