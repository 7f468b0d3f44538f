"""meshnet without Kubernetes: Topologies in a local store and a podman network that runs meshnet.

On a single host, `meshnetd --single-node --store sqlite:///...` is the node's daemon, and
`meshnetctl topology apply FILE` loads the Topologies of a manifest into the same store (the lab
and any Kubernetes-less setup use it alike). `meshnetctl podman-network` writes a podman (CNI
backend) network whose conflist gives each container `eth0` from `bridge` + `host-local` and then
chains meshnet, which adds the container's links. Podman names the container in
`K8S_POD_NAME` and passes no namespace, so a container's name must equal its Topology's name in
namespace `default`. How-to: docs/podman.md.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshnet import naming
from meshnet.cni.protocol import DEFAULT_CONF_DIR, DEFAULT_DAEMON_SOCKET
from meshnet.install import write_atomic
from meshnet.model import Manifest, Topology, load_manifest
from meshnet.store.base import Store

DEFAULT_STORE = "sqlite:///var/lib/meshnet/store.db"
PODMAN_NETWORK = "meshnet"
PODMAN_BRIDGE = "mnpod0"  # meshnet's prefix: the bridge lives in the host's namespace
# eth0 addresses: a documentation range, bridged only among the containers (no masquerading and no
# route towards the host's real interfaces, so nothing a container sends leaves this host).
PODMAN_SUBNET = "203.0.113.0/24"
PODMAN_CONF_DIR = DEFAULT_CONF_DIR  # podman reads CNI configs where every runtime does


class StandaloneError(Exception):
    """A bad argument or file; the message names it."""


def store_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MESHNET_STORE") or DEFAULT_STORE


def _open(url: str) -> Store:
    from meshnet.store import open_store

    parts = urlsplit(url)
    if parts.scheme == "sqlite" and parts.path:
        # A fresh host has no /var/lib/meshnet yet; sqlite creates the file, not its directory.
        Path(parts.path).parent.mkdir(parents=True, exist_ok=True)
    try:
        return open_store(url)
    except ValueError as e:
        raise StandaloneError(str(e)) from e


def _manifest(path: str | Path) -> Manifest:
    manifest = load_manifest(path)
    if not manifest.topologies:
        raise StandaloneError(f"{path}: no Topology in it")
    return manifest


def apply_topologies(path: str | Path, url: str) -> list[Topology]:
    """Create, or replace the spec of, every Topology of the manifest at `path` (status is kept)."""
    manifest = _manifest(path)
    store = _open(url)
    try:
        return [store.apply(Topology(t.name, t.namespace, t.links)) for t in manifest.topologies]
    finally:
        store.close()


def delete_topologies(path: str | Path, url: str) -> list[tuple[Topology, bool]]:
    """Remove every Topology of the manifest at `path`; each with whether it was there."""
    manifest = _manifest(path)
    store = _open(url)
    try:
        return [(t, store.delete(t.namespace, t.name)) for t in manifest.topologies]
    finally:
        store.close()


def podman_network(name: str = PODMAN_NETWORK, *, bridge: str = PODMAN_BRIDGE, subnet: str = PODMAN_SUBNET,
                   socket: str = DEFAULT_DAEMON_SOCKET, ipam_dir: str | None = None,
                   log_file: str | None = None) -> dict[str, Any]:
    """The conflist of a podman network: `bridge` + `host-local` give eth0, meshnet is chained after."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise StandaloneError(f"network name {name!r}: letters, digits, '-' and '_' only")
    why = naming.ifname_problem(bridge)
    if why:
        raise StandaloneError(f"bridge {bridge!r}: {why}")
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as e:
        raise StandaloneError(f"subnet {subnet!r}: {e}") from e
    if not os.path.isabs(socket):
        raise StandaloneError(f"daemon socket {socket!r} must be an absolute path")
    ipam: dict[str, Any] = {"type": "host-local", "ranges": [[{"subnet": str(net)}]]}
    if ipam_dir:
        ipam["dataDir"] = ipam_dir
    meshnet: dict[str, Any] = {"type": "meshnet", "daemon_socket": socket}
    if log_file:
        meshnet["log_file"] = log_file
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            # isGateway gives the bridge the subnet's first address so containers can reach the
            # host; ipMasq stays off, so their traffic is never NATed out of the real interfaces.
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False, "hairpinMode": False,
             "ipam": ipam},
            meshnet,
        ],
    }


def write_podman_network(conf_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write `<conf_dir>/<name>.conflist`, where podman's CNI backend (`network_config_dir`) finds it."""
    target = Path(conf_dir) / f"{config['name']}.conflist"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, (json.dumps(config, indent=2) + "\n").encode(), mode=0o644)
    return target
