"""`meshnetctl plan`: the whole emulated lab as one replayable shell script.

Nodes are namespaces `<P>node<i>` joined by an underlay bridge in `<P>ul` (198.51.100.0/24), pods
are namespaces `<P><pod>`, and every link is rendered by the same templates the daemons use,
decided by the same planner, in the order a sequence of ADDs would take.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshnet import naming
from meshnet.command import Command, script
from meshnet.model import Manifest
from meshnet.plan import (
    LabLayout,
    LinkPlan,
    MacvlanPlan,
    NodeInfo,
    every_link_plan,
    place_pods,
    pod_names,
    simulate_adds,
)
from meshnet.render import render

UNDERLAY = ipaddress.ip_network("198.51.100.0/24")
EXTERNAL_HOST = 254  # the external namespace's address on the underlay


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class DryRunLab:
    prefix: str
    layout: LabLayout
    manifest: Manifest

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}ul"

    @property
    def external_ns(self) -> str:
        return f"{self.prefix}ext"


def layout_for(manifest: Manifest, nodes: int, prefix: str) -> DryRunLab:
    if not 1 <= nodes <= 200:
        raise PlanError(f"--nodes: {nodes} is outside 1..200")
    why = naming.netns_problem(f"{prefix}node0")
    if why:
        raise PlanError(f"--prefix: {why}")
    infos = tuple(NodeInfo(f"node{i}", str(UNDERLAY[i + 1]), "eth0", f"{prefix}node{i}") for i in range(nodes))
    placement = place_pods(manifest, nodes)
    keys = pod_names(manifest)
    pod_netns = {k: f"{prefix}{k.split('/', 1)[1]}" for k in keys}
    namespaces = {k.split("/", 1)[0] for k in keys}
    if len(namespaces) > 1:
        # Pod namespaces would collide on their names: the dry-run lab is one Kubernetes namespace.
        raise PlanError(f"the dry-run lab holds pods of one Kubernetes namespace, got {sorted(namespaces)}")
    infra = {f"{prefix}ul", f"{prefix}ext", *(n.netns or "" for n in infos)}
    for key, ns in pod_netns.items():
        why = naming.netns_problem(ns)
        if why:
            raise PlanError(f"pod namespace: {why}")
        if ns in infra:
            raise PlanError(f"pod {key}: its namespace {ns} is one the emulated cluster itself uses "
                            f"(nodes, ul, ext); choose another --prefix or pod name")
    layout = LabLayout(infos, {k: f"node{placement[k]}" for k in keys}, pod_netns)
    return DryRunLab(prefix, layout, manifest)


def _external_address(plan: MacvlanPlan) -> str | None:
    """An address for the external namespace in a macvlan link's subnet, so its end can be pinged."""
    if plan.local.ip is None:
        return None
    net = plan.local.ip.network
    if net.num_addresses < 4:
        return None
    hosts = [net.broadcast_address - 1, net.broadcast_address - 2]
    pick = next(h for h in hosts if h != plan.local.ip.ip)
    return f"{pick}/{net.prefixlen}"


def link_commands(lab: DryRunLab) -> list[Command]:
    return render(every_link_plan(simulate_adds(lab.manifest, lab.layout)), "add")


def infra_commands(prefix: str, nodes: Sequence[NodeInfo], external_addrs: Iterable[str] = ()) -> list[Command]:
    """The emulated cluster around the pods, in order: underlay bridge, nodes, external namespace.

    Shared by the dry-run script and `meshnetctl lab`, so both build the same thing.
    """
    ul, ext = f"{prefix}ul", f"{prefix}ext"
    plen = UNDERLAY.prefixlen
    cmds = [Command(None, ("netns", "add", ul)), Command(ul, ("link", "add", "br0", "type", "bridge")),
            Command(ul, ("link", "set", "br0", "up"))]
    for i, node in enumerate(nodes):
        assert node.netns is not None
        cmds += [
            Command(None, ("netns", "add", node.netns)),
            Command(node.netns, ("link", "set", "lo", "up")),
            Command(ul, ("link", "add", f"ul{i}", "type", "veth", "peer", "name", "eth0", "netns", node.netns)),
            Command(ul, ("link", "set", f"ul{i}", "master", "br0", "up")),
            Command(node.netns, ("addr", "add", f"{node.vtep_ip}/{plen}", "dev", "eth0")),
            Command(node.netns, ("link", "set", "eth0", "up")),
        ]
    cmds += [
        Command(None, ("netns", "add", ext)),
        Command(ul, ("link", "add", "ulx", "type", "veth", "peer", "name", "eth0", "netns", ext)),
        Command(ul, ("link", "set", "ulx", "master", "br0", "up")),
        Command(ext, ("addr", "add", f"{UNDERLAY[EXTERNAL_HOST]}/{plen}", "dev", "eth0")),
        Command(ext, ("link", "set", "eth0", "up")),
    ]
    cmds += [Command(ext, ("addr", "add", a, "dev", "eth0")) for a in sorted(set(external_addrs))]
    return cmds


def external_addresses(plans: Iterable[LinkPlan]) -> set[str]:
    return {a for a in (_external_address(p) for p in plans if isinstance(p, MacvlanPlan)) if a}


def setup_script(lab: DryRunLab) -> str:
    plans = every_link_plan(simulate_adds(lab.manifest, lab.layout))
    out = ["#!/bin/sh", "# meshnet dry-run: replay as root to build the lab", "set -e",
           f"# the emulated cluster: underlay {lab.underlay_ns} ({UNDERLAY}), nodes, external {lab.external_ns}"]
    out += [c.shell() for c in infra_commands(lab.prefix, lab.layout.nodes, external_addresses(plans))]
    out.append("# pods")
    for key in pod_names(lab.manifest):
        ns = lab.layout.pod_netns[key]
        out += [f"ip netns add {ns}  # {key} on {lab.layout.pod_node[key]}", f"ip -n {ns} link set lo up"]
    body = script(render(plans, "add"), header="links: one ip -batch per namespace and phase")
    return "\n".join(out) + "\n" + body.split("\n", 2)[2]


def teardown_script(lab: DryRunLab) -> str:
    names = [lab.layout.pod_netns[k] for k in pod_names(lab.manifest)]
    names += [n.netns or "" for n in lab.layout.nodes] + [lab.external_ns, lab.underlay_ns]
    lines = ["#!/bin/sh", "# meshnet dry-run teardown: deleting a namespace removes every interface in it"]
    lines += [f"ip netns del {n} 2>/dev/null || true" for n in names]
    return "\n".join(lines) + "\n"
