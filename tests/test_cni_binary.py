"""The standalone `meshnet` CNI binary (scripts/build-cni-binary): runs where no Python is.

The build takes a minute or two and is cached in build/cni-binary (rebuilt only when the shim's
sources, Python or Nuitka change), so only the first run of this module is slow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from meshnet.cni import protocol

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "cni-binary"
BINARY = OUT / "meshnet"
NO_PYTHON_ENV = {"PATH": "/nonexistent"}  # what `env -i PATH=/nonexistent` leaves

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def build() -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "build-cni-binary"), str(OUT)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def binary() -> Path:
    out = build()
    assert out.returncode == 0, f"build-cni-binary failed:\n{out.stdout}\n{out.stderr}"
    return BINARY


def run(binary: Path, command: str, config: dict[str, object], *,
        preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**NO_PYTHON_ENV, "CNI_COMMAND": command, "CNI_CONTAINERID": "mnt-binary-test",
           "CNI_NETNS": "/var/run/netns/mnt-binary-test", "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}
    return subprocess.run([str(binary)], input=json.dumps(config), env=env, capture_output=True, text=True,
                          timeout=30, preexec_fn=preexec_fn)


def test_build_is_cached(binary: Path) -> None:
    stamp = (OUT / ".build-stamp").read_text()
    mtime = binary.stat().st_mtime_ns
    again = build()
    assert again.returncode == 0 and "up to date" in again.stdout
    assert binary.stat().st_mtime_ns == mtime and (OUT / ".build-stamp").read_text() == stamp


def test_version_without_python(binary: Path) -> None:
    out = run(binary, "VERSION", {"cniVersion": "1.0.0", "name": "n", "type": "meshnet"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"cniVersion": "1.0.0", "supportedVersions": list(protocol.SUPPORTED_VERSIONS)}


def test_add_without_daemon_is_try_again_later_naming_the_socket(binary: Path, tmp_path: Path) -> None:
    socket = str(tmp_path / "meshnet.sock")
    out = run(binary, "ADD", {"cniVersion": "1.0.0", "name": "n", "type": "meshnet", "daemon_socket": socket})
    assert out.returncode == 1
    error = json.loads(out.stdout)
    assert error["code"] == protocol.TRY_AGAIN_LATER and error["cniVersion"] == "1.0.0"
    assert socket in error["details"]


def test_links_no_python_library(binary: Path) -> None:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    libs = out.stdout
    assert "libpython" not in libs or str(OUT) in libs, libs


def _hide_python() -> None:
    """In the child: a private mount namespace in which every Python installation is an empty dir."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    clone_newns, ms_rec, ms_private = 0x00020000, 0x4000, 0x40000
    if libc.unshare(clone_newns) != 0 or libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0:
        raise OSError(ctypes.get_errno(), "unshare/mount")
    for path in PYTHON_DIRS:
        if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, None) != 0:
            raise OSError(ctypes.get_errno(), f"mount tmpfs on {path}")


PYTHON_DIRS = sorted(
    {sys.base_prefix, sys.prefix, *glob.glob("/usr/lib/python3*"), *glob.glob("/usr/local/lib/python3*")}
    - {"/usr", "/usr/local"})


@pytest.mark.root
def test_runs_on_a_host_without_python(binary: Path, tmp_path: Path) -> None:
    """Every Python on this machine hidden (tmpfs over it, in a private mount namespace)."""
    assert os.geteuid() == 0
    for python in {os.path.realpath(sys.executable), *glob.glob("/usr/bin/python3*")}:
        try:
            probe = subprocess.run([python, "-c", "pass"], preexec_fn=_hide_python, capture_output=True)
        except FileNotFoundError:
            continue  # the interpreter itself is hidden
        assert probe.returncode != 0, f"canary: {python} still starts, so hiding Python did not work"
    out = run(binary, "VERSION", {"cniVersion": "0.4.0", "name": "n", "type": "meshnet"}, preexec_fn=_hide_python)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cniVersion"] == "0.4.0"
    socket = str(tmp_path / "meshnet.sock")
    # ADD: since issue 13 a DEL completes without the daemon, an ADD still answers try-again-later.
    out = run(binary, "ADD", {"cniVersion": "1.0.0", "name": "n", "type": "meshnet", "daemon_socket": socket},
              preexec_fn=_hide_python)
    assert json.loads(out.stdout)["code"] == protocol.TRY_AGAIN_LATER


def test_installed_bundle_runs_from_the_cni_bin_dir(binary: Path, tmp_path: Path) -> None:
    """install-cni's copy (a bundle directory behind a link in the bin dir) is what runtimes exec."""
    from meshnet import install

    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    (conf_dir / "10-ptp.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "p", "type": "ptp"}))
    link = tmp_path / "usr-local-bin-meshnet"
    link.symlink_to(binary)  # as in the image
    install.install(conf_dir, bin_dir, binary=link)
    out = run(bin_dir / "meshnet", "VERSION", {"cniVersion": "1.1.0", "name": "n", "type": "meshnet"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cniVersion"] == "1.1.0"


@pytest.mark.root
def test_drives_an_add_in_the_lab_with_no_python_on_its_path(binary: Path, tmp_path: Path) -> None:
    """The kubelet's view: /opt/cni/bin/meshnet is this binary, run with a PATH that has no Python."""
    from tests.labkit import failed_pings, lab_up

    with lab_up(tmp_path, ROOT / "tests" / "3node.yml", nodes=3, cni_bin=[str(binary)],
                cni_env_path=NO_PYTHON_ENV["PATH"]) as lab:
        assert lab.state.cni_bin == [str(binary)]
        assert all(rec.state == "up" for rec in lab.state.pods.values()), lab.state.pods
        assert [(lk["kind"], lk["state"]) for lk in lab.status()["links"]] == [("vxlan", "up")] * 3
        assert not failed_pings(lab)
