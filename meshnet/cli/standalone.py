"""`meshnetctl topology apply|delete` and `meshnetctl podman-network`: meshnet without Kubernetes
(meshnet.standalone)."""

from __future__ import annotations

import argparse
from typing import Any

from meshnet.cli import output
from meshnet.cni.protocol import DEFAULT_DAEMON_SOCKET
from meshnet.model import ManifestError
from meshnet.standalone import (
    DEFAULT_STORE,
    PODMAN_BRIDGE,
    PODMAN_CONF_DIR,
    PODMAN_NETWORK,
    PODMAN_SUBNET,
    StandaloneError,
    apply_topologies,
    delete_topologies,
    podman_network,
    store_url,
    write_podman_network,
)
from meshnet.store.base import StoreError


def _cmd_topology(args: argparse.Namespace) -> int:
    url = store_url(args.store)
    try:
        if args.topology_command == "apply":
            for t in apply_topologies(args.file, url):
                print(f"topology {t.namespace}/{t.name} applied ({len(t.links)} links)")
        else:
            for t, existed in delete_topologies(args.file, url):
                print(f"topology {t.namespace}/{t.name} {'deleted' if existed else 'not found'}")
    except ManifestError as e:
        output.problems(f"meshnetctl topology {args.topology_command}: {args.file}: invalid", e.problems)
        return 1
    except (StandaloneError, StoreError, OSError) as e:
        return output.fail(f"topology {args.topology_command}", e)
    return 0


def _cmd_podman_network(args: argparse.Namespace) -> int:
    try:
        config = podman_network(args.name, bridge=args.bridge, subnet=args.subnet, socket=args.socket,
                                ipam_dir=args.ipam_dir or None, log_file=args.log_file or None)
    except StandaloneError as e:
        return output.fail("podman-network", e)
    if args.print:
        output.print_json(config, indent=2)
        return 0
    print(write_podman_network(args.conf_dir, config))
    return 0


def add_parsers(sub: Any) -> None:
    """Register `topology apply|delete` and `podman-network` on meshnetctl's subparsers."""
    topo = sub.add_parser("topology", help="load Topologies into a local store (no Kubernetes)")
    tsub = topo.add_subparsers(dest="topology_command", required=True, metavar="TOPOLOGY_COMMAND")
    for cmd, text in (("apply", "create or replace every Topology of a manifest"),
                      ("delete", "remove every Topology of a manifest")):
        p = tsub.add_parser(cmd, help=text)
        p.add_argument("file")
        p.add_argument("--store", default="",
                       help=f"store URL (default: env MESHNET_STORE, else {DEFAULT_STORE})")
        p.set_defaults(func=_cmd_topology)

    p = sub.add_parser("podman-network", help="write a podman (CNI backend) network that runs meshnet")
    p.add_argument("--name", default=PODMAN_NETWORK, help=f"network name; default {PODMAN_NETWORK}")
    p.add_argument("--conf-dir", default=PODMAN_CONF_DIR,
                   help=f"podman's network_config_dir; default {PODMAN_CONF_DIR}")
    p.add_argument("--bridge", default=PODMAN_BRIDGE, help=f"host bridge for eth0; default {PODMAN_BRIDGE}")
    p.add_argument("--subnet", default=PODMAN_SUBNET, help=f"eth0 subnet; default {PODMAN_SUBNET}")
    p.add_argument("--socket", default=DEFAULT_DAEMON_SOCKET, help="meshnetd's socket")
    p.add_argument("--ipam-dir", default="", help="host-local's dataDir (default: /var/lib/cni/networks)")
    p.add_argument("--log-file", default="", help="the CNI shim's log file")
    p.add_argument("--print", action="store_true", help="print the conflist instead of writing it")
    p.set_defaults(func=_cmd_podman_network)
