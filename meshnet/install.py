"""Install meshnet's CNI binary and network config on a node (`meshnetctl install-cni`).

Runs in the DaemonSet's init container with the host's CNI directories mounted. It finds the
network config the node already uses (the "master" plugin that gives pods `eth0`) and writes
`00-meshnet.conflist` in front of it, in one of two forms:

- delegate (default, the original's form): meshnet is the only plugin of the list and carries the
  WHOLE original network under `delegate` (a single plugin dict, or a conflist dict with all of its
  plugins), which meshnetd runs the way libcni would. The original took only `plugins[0]` of a
  conflist and so dropped kindnet's portmap (upstream #28): nothing is dropped here.
- chain: the original conflist with meshnet appended as its last plugin; meshnet then gets the
  master plugin's result as `prevResult`.

Runtimes use the first config file in sort order, so `00-` wins while the original stays in place.
Standard library only (like meshnet.cni.protocol, whose version list it shares).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from meshnet.cni import protocol

MESHNET_CONF = "00-meshnet.conflist"
PLUGIN_TYPE = "meshnet"
# The one default lives with the CNI protocol (the shim reads it); this name stays for meshnet/cli.py.
# scripts/build-cni-binary leaves this file in every standalone build it makes.
BUNDLE_MARKER = ".build-stamp"
# The suffixes libcni (and so containerd and CRI-O) read as network configs, in its sort order.
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")

Mode = Literal["delegate", "chain"]
MODES: tuple[Mode, ...] = ("delegate", "chain")


class InstallError(Exception):
    """The node's CNI config cannot be used; the message names the file and what is wrong."""


def find_network_config(conf_dir: Path) -> Path:
    """The network config the runtime uses when meshnet's is not there: the first by file name."""
    if not conf_dir.is_dir():
        raise InstallError(f"{conf_dir}: CNI config directory does not exist")
    candidates = sorted(
        (p for p in conf_dir.iterdir()
         if p.suffix in CONFIG_SUFFIXES and p.name != MESHNET_CONF and p.is_file()),
        key=lambda p: p.name,
    )
    if not candidates:
        raise InstallError(
            f"{conf_dir}: no network config (*.conf, *.conflist, *.json) besides meshnet's own; "
            "meshnet needs the cluster's pod network (kindnet, flannel, calico ...) installed first")
    return candidates[0]


def load_network_config(path: Path) -> dict[str, Any]:
    """Read and check a network config: a single plugin config or a conflist (decided by content,
    as some distributions write conflists under `.conf`)."""
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError) as e:
        raise InstallError(f"{path}: cannot read: {e}") from e
    except json.JSONDecodeError as e:
        raise InstallError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise InstallError(f"{path}: must be a JSON object, not {type(raw).__name__}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise InstallError(f"{path}: 'name' is missing or not a string")
    if not isinstance(raw.get("cniVersion", ""), str):
        raise InstallError(f"{path}: 'cniVersion' must be a string")
    is_list = "plugins" in raw
    plugins = raw.get("plugins", [raw])
    if is_list and (not isinstance(plugins, list) or not plugins):
        raise InstallError(f"{path}: 'plugins' must be a non-empty list")
    for i, plugin in enumerate(plugins):
        where = f"{path}: plugins[{i}]" if is_list else str(path)
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) or not plugin["type"]:
            raise InstallError(f"{where}: has no plugin 'type'")
        if not isinstance(plugin.get("capabilities", {}), dict):
            raise InstallError(f"{where}: 'capabilities' must be an object")
        # Delegating to (or chaining after) meshnet itself would make meshnetd call itself.
        if plugin["type"] == PLUGIN_TYPE:
            raise InstallError(f"{where}: already a meshnet plugin; give meshnet the pod network's "
                               "own config, not one that contains meshnet")
    return raw


def render_config(original: dict[str, Any], *, mode: Mode = "delegate", socket: str = protocol.DEFAULT_DAEMON_SOCKET,
                  log_file: str | None = None) -> dict[str, Any]:
    """meshnet's conflist for a checked `original` (pure)."""
    if mode not in MODES:
        raise InstallError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    # libcni reads a config without cniVersion as 0.1.0.
    version = original.get("cniVersion") or "0.1.0"
    meshnet: dict[str, Any] = {"type": PLUGIN_TYPE, "name": PLUGIN_TYPE, "daemon_socket": socket}
    if log_file:
        meshnet["log_file"] = log_file
    is_list = "plugins" in original
    plugins: list[dict[str, Any]] = original["plugins"] if is_list else [original]
    if mode == "chain":
        if version not in protocol.SUPPORTED_VERSIONS:
            raise InstallError(f"network {original['name']!r} is cniVersion {version}: chaining needs one of "
                               f"{', '.join(protocol.SUPPORTED_VERSIONS)} (prevResult); use delegate mode")
        # A conflist keeps its other top-level keys (disableCheck, disableGC ...).
        head = original if is_list else {"cniVersion": version, "name": original["name"]}
        return {**head, "plugins": [*plugins, meshnet]}
    # The runtime passes runtimeConfig (port mappings, bandwidth ...) only to plugins that declare
    # the capability, and meshnet is the list's only plugin: declare what the delegate's plugins
    # declare, so meshnetd receives it and hands it on to them.
    capabilities = {name: True for p in plugins for name, on in p.get("capabilities", {}).items() if on}
    if capabilities:
        meshnet["capabilities"] = dict(sorted(capabilities.items()))
    meshnet["delegate"] = original
    # meshnet answers in its own config's version and meshnetd converts the delegate's result
    # (any version) to it; an old delegate (0.1.0/0.2.0) therefore puts meshnet on 0.3.1.
    own_version = version if version in protocol.SUPPORTED_VERSIONS else "0.3.1"
    return {"cniVersion": own_version, "name": original["name"], "plugins": [meshnet]}


def wait_for_network_config(conf_dir: Path, timeout: float, *, interval: float = 1.0) -> Path:
    """`find_network_config`, retried for up to `timeout` seconds: on a new node the pod network's
    agent may write its config after meshnet's init container has started."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return find_network_config(conf_dir)
        except InstallError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def install(conf_dir: Path | str, bin_dir: Path | str, *, mode: Mode = "delegate",
            binary: Path | str | None = None, socket: str = protocol.DEFAULT_DAEMON_SOCKET,
            log_file: str | None = None, wait: float = 0.0) -> Path:
    """Write `00-meshnet.conflist` for the node's network (and copy the CNI binary when given).

    `wait`: seconds to wait for the node's network config to appear. Idempotent: unchanged
    content is not rewritten. Returns the path of meshnet's config.
    """
    conf_dir, bin_dir = Path(conf_dir), Path(bin_dir)
    original_path = wait_for_network_config(conf_dir, wait)
    config = render_config(load_network_config(original_path), mode=mode, socket=socket, log_file=log_file)
    # The binary goes first: a config naming meshnet must never be in place without it.
    if binary is not None:
        install_binary(Path(binary), bin_dir)
    # The original file stays as it is, neither edited nor renamed: the pod network's own agent
    # (kindnet, flannel, calico ...) owns it and rewrites or re-checks it, and a renamed file would
    # either come back (and be picked up twice) or leave that agent "not ready". `00-` only has to
    # sort first for runtimes to use meshnet's.
    target = conf_dir / MESHNET_CONF
    write_atomic(target, (json.dumps(config, indent=2) + "\n").encode(), mode=0o644)
    return target


def uninstall(conf_dir: Path | str, bin_dir: Path | str) -> None:
    """Remove meshnet's config and binary; the original config is then the node's again."""
    for path in (Path(conf_dir) / MESHNET_CONF, Path(bin_dir) / PLUGIN_TYPE):
        path.unlink(missing_ok=True)
    _remove_bundles(Path(bin_dir), keep=None)


def install_binary(source: Path, bin_dir: Path) -> Path:
    """Put the CNI binary at `bin_dir/meshnet`, atomically (a runtime may exec it at any moment).

    `source` is either one executable file, or the standalone build's directory (see
    scripts/build-cni-binary) whose entry point is `source/meshnet`, or that entry point or a
    link to it (the image's /usr/local/bin/meshnet). A standalone build is copied whole to
    `bin_dir/.meshnet-<digest>/` and `bin_dir/meshnet` becomes a symlink to the entry point in it,
    swapped in one rename; bundles of older versions are removed afterwards.
    """
    if not source.exists():
        raise InstallError(f"{source}: CNI binary not found")
    source = source.resolve()
    if source.is_file() and (source.parent / BUNDLE_MARKER).is_file():
        source = source.parent
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / PLUGIN_TYPE
    if source.is_file():
        write_atomic(target, source.read_bytes(), mode=0o755)
        _remove_bundles(bin_dir, keep=None)
        return target
    if not (source / PLUGIN_TYPE).is_file():
        raise InstallError(f"{source}: standalone build has no entry point {PLUGIN_TYPE!r}")
    bundle = bin_dir / f".{PLUGIN_TYPE}-{_tree_digest(source)}"
    if not bundle.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f".{PLUGIN_TYPE}-", suffix=".tmp", dir=bin_dir))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True, symlinks=True)
            staging.chmod(0o755)
            staging.rename(bundle)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    link_to = f"{bundle.name}/{PLUGIN_TYPE}"
    if not (target.is_symlink() and os.readlink(target) == link_to):
        temp_link = bin_dir / f".{PLUGIN_TYPE}.link.tmp"
        temp_link.unlink(missing_ok=True)
        temp_link.symlink_to(link_to)
        temp_link.replace(target)
        _fsync_dir(bin_dir)
    _remove_bundles(bin_dir, keep=bundle)
    return target


def write_atomic(path: Path, data: bytes, *, mode: int) -> bool:
    """Replace `path` by `data` through a temp file + fsync + rename; False when already equal.

    The temp file's name ends in `.tmp`, a suffix runtimes do not read, so a half-written config
    is never picked up.
    """
    with contextlib.suppress(OSError):
        if not path.is_symlink() and path.read_bytes() == data:
            return False
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_digest(root: Path) -> str:
    """A short digest of a directory's file names and contents (names the installed bundle)."""
    digest = hashlib.sha256()
    for path in sorted(_files(root)):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path


def _remove_bundles(bin_dir: Path, *, keep: Path | None) -> None:
    """Remove installed standalone bundles (and staging leftovers) other than `keep`. A shim that
    is running from a removed bundle keeps its open files; new runs use the new symlink."""
    if not bin_dir.is_dir():
        return
    for path in bin_dir.glob(f".{PLUGIN_TYPE}-*"):
        if path.is_dir() and path != keep:
            shutil.rmtree(path, ignore_errors=True)
