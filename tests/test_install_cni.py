"""`meshnetctl install-cni` (meshnet.install) against the configs real pod networks write.

Each case copies a node's /etc/cni/net.d from tests/fixtures/cni-configs into a temporary host root
and installs meshnet there, as the DaemonSet's init container does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meshnet import install
from meshnet.cni import protocol
from meshnet.install import InstallError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cni-configs"
NETWORKS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def node(tmp_path: Path, network: str) -> tuple[Path, Path]:
    """A host root with `network`'s config dir and an empty CNI bin dir: (conf_dir, bin_dir)."""
    conf_dir, bin_dir = tmp_path / "etc/cni/net.d", tmp_path / "opt/cni/bin"
    shutil.copytree(FIXTURES / network, conf_dir)
    bin_dir.mkdir(parents=True)
    return conf_dir, bin_dir


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file()}


def original_of(network: str) -> tuple[str, dict[str, Any]]:
    (path,) = [p for p in (FIXTURES / network).iterdir() if p.suffix in install.CONFIG_SUFFIXES]
    return path.name, json.loads(path.read_text())


def runtime_pick(conf_dir: Path) -> dict[str, Any]:
    """What libcni-based runtimes load: the first config file by name, checked as they check it."""
    name = sorted(p.name for p in conf_dir.iterdir() if p.suffix in install.CONFIG_SUFFIXES)[0]
    conf = json.loads((conf_dir / name).read_text())
    assert name.endswith(".conflist")
    assert isinstance(conf["name"], str) and conf["name"]
    assert conf["cniVersion"] in protocol.SUPPORTED_VERSIONS
    assert conf["plugins"] and all(isinstance(p["type"], str) and p["type"] for p in conf["plugins"])
    return conf


@pytest.mark.parametrize("network", NETWORKS)
def test_delegate_mode_keeps_the_whole_network(tmp_path: Path, network: str) -> None:
    conf_dir, bin_dir = node(tmp_path, network)
    before = snapshot(conf_dir)
    name, original = original_of(network)

    written = install.install(conf_dir, bin_dir, socket="/run/meshnet/meshnet.sock", log_file="/var/log/m.log")

    assert written == conf_dir / "00-meshnet.conflist"
    conf = runtime_pick(conf_dir)
    (meshnet,) = conf["plugins"]
    assert meshnet["type"] == "meshnet"
    assert meshnet["daemon_socket"] == "/run/meshnet/meshnet.sock"
    assert meshnet["log_file"] == "/var/log/m.log"
    assert meshnet["delegate"] == original  # every plugin, every key, in order
    assert conf["name"] == original["name"]
    assert conf["cniVersion"] == original.get("cniVersion", "0.3.1")
    declared = {c for p in original.get("plugins", [original]) for c, on in p.get("capabilities", {}).items() if on}
    assert set(meshnet.get("capabilities", {})) == declared
    # The pod network's own files are untouched, byte for byte and in time.
    assert {k: v for k, v in snapshot(conf_dir).items() if k != "00-meshnet.conflist"} == before
    assert name in before


@pytest.mark.parametrize("network", [n for n in NETWORKS if n != "weave-legacy-conf"])
def test_chain_mode_appends_meshnet_last(tmp_path: Path, network: str) -> None:
    conf_dir, bin_dir = node(tmp_path, network)
    _, original = original_of(network)

    install.install(conf_dir, bin_dir, mode="chain")

    conf = runtime_pick(conf_dir)
    plugins = original.get("plugins", [original])
    assert conf["plugins"][:-1] == plugins
    meshnet = {"type": "meshnet", "name": "meshnet", "daemon_socket": protocol.DEFAULT_DAEMON_SOCKET}
    assert conf["plugins"][-1] == meshnet
    assert (conf["name"], conf["cniVersion"]) == (original["name"], original["cniVersion"])


def test_chain_mode_needs_a_version_with_prev_result(tmp_path: Path) -> None:
    conf_dir, bin_dir = node(tmp_path, "weave-legacy-conf")
    with pytest.raises(InstallError, match=r"'weave' is cniVersion 0\.1\.0: chaining needs"):
        install.install(conf_dir, bin_dir, mode="chain")
    assert not (conf_dir / "00-meshnet.conflist").exists()


@pytest.mark.parametrize("mode", install.MODES)
def test_rerunning_changes_nothing(tmp_path: Path, mode: install.Mode) -> None:
    conf_dir, bin_dir = node(tmp_path, "kindnet")
    binary = tmp_path / "meshnet-build"
    binary.write_bytes(b"\x7fELF pretend")
    install.install(conf_dir, bin_dir, mode=mode, binary=binary)
    conf_before, bin_before = snapshot(conf_dir), snapshot(bin_dir)

    install.install(conf_dir, bin_dir, mode=mode, binary=binary)

    assert snapshot(conf_dir) == conf_before
    assert snapshot(bin_dir) == bin_before
    assert not [p for p in [*conf_dir.iterdir(), *bin_dir.iterdir()] if p.name.endswith(".tmp")]


def test_a_changed_network_or_mode_is_rewritten(tmp_path: Path) -> None:
    conf_dir, bin_dir = node(tmp_path, "flannel")
    target = install.install(conf_dir, bin_dir)
    original = json.loads((conf_dir / "10-flannel.conflist").read_text())
    original["plugins"].append({"type": "bandwidth", "capabilities": {"bandwidth": True}})
    (conf_dir / "10-flannel.conflist").write_text(json.dumps(original))

    install.install(conf_dir, bin_dir)
    assert json.loads(target.read_text())["plugins"][0]["delegate"] == original

    install.install(conf_dir, bin_dir, mode="chain")
    chained = json.loads(target.read_text())["plugins"]
    assert [p["type"] for p in chained] == ["flannel", "portmap", "bandwidth", "meshnet"]


@pytest.mark.parametrize("network", NETWORKS)
def test_uninstall_leaves_only_the_original(tmp_path: Path, network: str) -> None:
    conf_dir, bin_dir = node(tmp_path, network)
    before = snapshot(conf_dir)
    binary = tmp_path / "meshnet-build"
    binary.write_bytes(b"shim")
    install.install(conf_dir, bin_dir, binary=binary)
    assert (bin_dir / "meshnet").exists()

    install.uninstall(conf_dir, bin_dir)

    assert snapshot(conf_dir) == before
    assert list(bin_dir.iterdir()) == []
    install.uninstall(conf_dir, bin_dir)  # again: nothing left to do, no error


def test_first_config_in_sort_order_wins_and_others_are_ignored(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "00-meshnet.conflist").write_text('{"stale": true}')  # ours, from an earlier install
    (conf_dir / "05-notes.txt").write_text("not a config")
    (conf_dir / "07-old.conflist.bak").write_text("{")
    b = {"cniVersion": "1.0.0", "name": "b", "plugins": [{"type": "bridge"}]}
    (conf_dir / "10-b.conflist").write_text(json.dumps(b))
    (conf_dir / "20-a.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "a", "type": "ptp"}))
    (conf_dir / "99-z.json").write_text("{")

    assert install.find_network_config(conf_dir) == conf_dir / "10-b.conflist"
    install.install(conf_dir, tmp_path / "bin")
    assert json.loads((conf_dir / "00-meshnet.conflist").read_text())["plugins"][0]["delegate"]["name"] == "b"


def test_a_conf_file_holding_a_conflist_is_read_as_one(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    listed = {"cniVersion": "0.4.0", "name": "k", "plugins": [{"type": "ptp"}, {"type": "portmap"}]}
    (conf_dir / "10-k.conf").write_text(json.dumps(listed))
    install.install(conf_dir, tmp_path / "bin", mode="chain")
    assert [p["type"] for p in json.loads((conf_dir / "00-meshnet.conflist").read_text())["plugins"]] == [
        "ptp", "portmap", "meshnet"]


BROKEN = {
    "not JSON": ("10-x.conflist", '{"cniVersion": "0.3.1", "name": "x", "plugins": [', "not valid JSON"),
    "not an object": ("10-x.conf", "[]", "must be a JSON object"),
    "no name": ("10-x.conf", '{"cniVersion": "0.3.1", "type": "ptp"}', "'name' is missing"),
    "no type": ("10-x.conf", '{"cniVersion": "0.3.1", "name": "x"}', "has no plugin 'type'"),
    "empty plugins": ("10-x.conflist", '{"cniVersion": "0.3.1", "name": "x", "plugins": []}', "non-empty list"),
    "plugin without type": ("10-x.conflist", '{"cniVersion": "0.3.1", "name": "x", "plugins": [{"type": "ptp"}, {}]}',
                            r"plugins\[1\]: has no plugin 'type'"),
    "meshnet inside": ("10-x.conflist", '{"cniVersion": "0.3.1", "name": "x", "plugins": [{"type": "meshnet"}]}',
                       "already a meshnet plugin"),
    "capabilities not an object": ("10-x.conf", '{"cniVersion": "0.3.1", "name": "x", "type": "portmap", '
                                   '"capabilities": ["portMappings"]}', "'capabilities' must be"),
    "version not a string": ("10-x.conf", '{"cniVersion": 1, "name": "x", "type": "ptp"}', "'cniVersion' must be"),
}


@pytest.mark.parametrize(("name", "content", "message"), BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_config_is_named_in_a_clear_error(tmp_path: Path, name: str, content: str, message: str) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / name).write_text(content)
    with pytest.raises(InstallError, match=message) as caught:
        install.install(conf_dir, tmp_path / "bin")
    assert str(conf_dir / name) in str(caught.value)
    assert not (conf_dir / "00-meshnet.conflist").exists()


def test_no_config_at_all(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    with pytest.raises(InstallError, match="does not exist"):
        install.install(conf_dir, tmp_path / "bin")
    conf_dir.mkdir()
    (conf_dir / "00-meshnet.conflist").write_text("{}")
    with pytest.raises(InstallError, match=r"no network config .* besides meshnet's own"):
        install.install(conf_dir, tmp_path / "bin")


def test_waits_for_the_pod_network_to_write_its_config(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    late = threading.Timer(0.3, lambda: shutil.copy(FIXTURES / "kindnet/10-kindnet.conflist", conf_dir))
    late.start()
    try:
        started = time.monotonic()
        install.install(conf_dir, tmp_path / "bin", wait=10)
        assert 0.3 <= time.monotonic() - started < 5
    finally:
        late.cancel()
    assert json.loads((conf_dir / "00-meshnet.conflist").read_text())["name"] == "kindnet"
    empty = tmp_path / "empty"
    empty.mkdir()
    started = time.monotonic()
    with pytest.raises(InstallError, match="no network config"):
        install.install(empty, tmp_path / "bin", wait=0.2)
    assert time.monotonic() - started >= 0.2


def test_unknown_mode(tmp_path: Path) -> None:
    conf_dir, bin_dir = node(tmp_path, "kindnet")
    with pytest.raises(InstallError, match="unknown mode 'sidecar'"):
        install.install(conf_dir, bin_dir, mode="sidecar")  # type: ignore[arg-type]


def test_binary_file_is_copied_executable(tmp_path: Path) -> None:
    conf_dir, bin_dir = node(tmp_path, "kindnet")
    source = tmp_path / "shim"
    source.write_text("#!/bin/sh\necho one\n")
    install.install(conf_dir, bin_dir, binary=source)
    target = bin_dir / "meshnet"
    assert target.is_file() and not target.is_symlink()
    assert os.stat(target).st_mode & 0o777 == 0o755
    assert subprocess.run([str(target)], capture_output=True, text=True, check=True).stdout == "one\n"

    source.write_text("#!/bin/sh\necho two\n")
    install.install(conf_dir, bin_dir, binary=source)
    assert subprocess.run([str(target)], capture_output=True, text=True, check=True).stdout == "two\n"


def test_standalone_build_directory_is_installed_behind_one_link(tmp_path: Path) -> None:
    """The standalone build is a directory; the runtime execs <bin>/meshnet, a link into it that
    is swapped atomically on upgrade."""
    conf_dir, bin_dir = node(tmp_path, "kindnet")
    build = tmp_path / "build"
    build.mkdir()
    (build / "libfake.so").write_bytes(b"lib v1")
    entry = build / "meshnet"
    entry.write_text('#!/bin/sh\ncat "$(dirname "$(readlink -f "$0")")/libfake.so"\n')
    entry.chmod(0o755)

    install.install(conf_dir, bin_dir, binary=build)
    target = bin_dir / "meshnet"
    assert target.is_symlink() and not os.path.isabs(os.readlink(target))
    assert subprocess.run([str(target)], capture_output=True, text=True, check=True).stdout == "lib v1"
    first_bundle = target.resolve().parent
    link_mtime = target.lstat().st_mtime_ns

    install.install(conf_dir, bin_dir, binary=build)  # same build: nothing moves
    assert target.lstat().st_mtime_ns == link_mtime and target.resolve().parent == first_bundle

    (build / "libfake.so").write_bytes(b"lib v2")
    install.install(conf_dir, bin_dir, binary=build)
    assert subprocess.run([str(target)], capture_output=True, text=True, check=True).stdout == "lib v2"
    assert not first_bundle.exists()  # the old version's bundle is gone
    assert [p.name for p in bin_dir.iterdir() if not p.name.startswith(".meshnet-")] == ["meshnet"]

    install.uninstall(conf_dir, bin_dir)
    assert list(bin_dir.iterdir()) == []


def test_a_link_to_a_standalone_entry_point_installs_the_whole_build(tmp_path: Path) -> None:
    """The image has /usr/local/bin/meshnet -> the build's entry point; the DaemonSet passes that."""
    conf_dir, bin_dir = node(tmp_path, "kindnet")
    build = tmp_path / "lib/meshnet-cni"
    build.mkdir(parents=True)
    (build / install.BUNDLE_MARKER).write_text("stamp")
    (build / "libfake.so").write_bytes(b"lib")
    entry = build / "meshnet"
    entry.write_text('#!/bin/sh\ncat "$(dirname "$(readlink -f "$0")")/libfake.so"\n')
    entry.chmod(0o755)
    link = tmp_path / "bin/meshnet"
    link.parent.mkdir()
    link.symlink_to(entry)

    install.install(conf_dir, bin_dir, binary=link)

    target = bin_dir / "meshnet"
    assert target.is_symlink()
    assert sorted(p.name for p in target.resolve().parent.iterdir()) == [install.BUNDLE_MARKER, "libfake.so", "meshnet"]
    assert subprocess.run([str(target)], capture_output=True, text=True, check=True).stdout == "lib"


def test_binary_problems(tmp_path: Path) -> None:
    conf_dir, bin_dir = node(tmp_path, "kindnet")
    with pytest.raises(InstallError, match="CNI binary not found"):
        install.install(conf_dir, bin_dir, binary=tmp_path / "missing")
    (tmp_path / "empty-build").mkdir()
    with pytest.raises(InstallError, match="no entry point 'meshnet'"):
        install.install(conf_dir, bin_dir, binary=tmp_path / "empty-build")
