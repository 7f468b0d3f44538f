"""`meshnetctl plan`: the whole emulated lab as one replayable shell script.

Nodes are namespaces `<P>node<i>` joined by an underlay bridge in `<P>ul` (198.51.100.0/24), pods
are namespaces `<P><pod>`, and every link is rendered by the same templates the daemons use,
decided by the same planner, in the order a sequence of ADDs would take.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshnet import naming
from meshnet.model import Manifest
from meshnet.plan import (
    LabLayout,
    MacvlanPlan,
    NodeInfo,
    every_link_plan,
    place_pods,
    pod_names,
    simulate_adds,
)
from meshnet.render import Command, render, script

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
    for ns in pod_netns.values():
        why = naming.netns_problem(ns)
        if why:
            raise PlanError(f"pod namespace: {why}")
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


def setup_script(lab: DryRunLab) -> str:
    steps = simulate_adds(lab.manifest, lab.layout)
    plans = every_link_plan(steps)
    out = [
        f"# underlay {lab.underlay_ns}: a bridge joining the nodes' eth0 ({UNDERLAY})",
        f"ip netns add {lab.underlay_ns}",
        f"ip -n {lab.underlay_ns} link add br0 type bridge",
        f"ip -n {lab.underlay_ns} link set br0 up",
    ]
    for i, node in enumerate(lab.layout.nodes):
        out += [
            f"# node {node.name}: VTEP {node.vtep_ip}",
            f"ip netns add {node.netns}",
            f"ip -n {node.netns} link set lo up",
            f"ip -n {lab.underlay_ns} link add ul{i} type veth peer name eth0 netns {node.netns}",
            f"ip -n {lab.underlay_ns} link set ul{i} master br0 up",
            f"ip -n {node.netns} addr add {node.vtep_ip}/{UNDERLAY.prefixlen} dev eth0",
            f"ip -n {node.netns} link set eth0 up",
        ]
    ext = lab.external_ns
    out += [
        f"# external {ext}: where macvlan ends (peer_pod: localhost) are reached from",
        f"ip netns add {ext}",
        f"ip -n {lab.underlay_ns} link add ulx type veth peer name eth0 netns {ext}",
        f"ip -n {lab.underlay_ns} link set ulx master br0 up",
        f"ip -n {ext} addr add {UNDERLAY[EXTERNAL_HOST]}/{UNDERLAY.prefixlen} dev eth0",
        f"ip -n {ext} link set eth0 up",
    ]
    ext_addrs = {a for a in (_external_address(p) for p in plans if isinstance(p, MacvlanPlan)) if a}
    out += [f"ip -n {ext} addr add {a} dev eth0" for a in sorted(ext_addrs)]
    out.append("# pods")
    for key in pod_names(lab.manifest):
        ns = lab.layout.pod_netns[key]
        out += [f"ip netns add {ns}  # {key} on {lab.layout.pod_node[key]}", f"ip -n {ns} link set lo up"]
    body = script(render(plans, "add"), header="links: one ip -batch per namespace and phase")
    head = "\n".join(["#!/bin/sh", "# meshnet dry-run: replay as root to build the lab", "set -e", *out])
    return head + "\n" + body.split("\n", 2)[2]


def teardown_script(lab: DryRunLab) -> str:
    names = [lab.layout.pod_netns[k] for k in pod_names(lab.manifest)]
    names += [n.netns or "" for n in lab.layout.nodes] + [lab.external_ns, lab.underlay_ns]
    lines = ["#!/bin/sh", "# meshnet dry-run teardown: deleting a namespace removes every interface in it"]
    lines += [f"ip netns del {n} 2>/dev/null || true" for n in names]
    return "\n".join(lines) + "\n"
