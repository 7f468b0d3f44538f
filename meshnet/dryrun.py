"""`meshnetctl plan`: the whole emulated lab as one replayable shell script.

Nodes are namespaces `<P>node<i>` joined by an underlay bridge in `<P>ul` (198.51.100.0/24), pods
are namespaces `<P><pod>`, and every link is rendered by the same templates the daemons use,
decided by the same planner, in the order a sequence of ADDs would take.

The placement of pods on nodes and that sequence of ADDs (`place_pods`, `simulate_adds`) live here
and serve `meshnetctl lab` as well, so the lab builds what the dry run prints.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshnet import naming
from meshnet.command import Command, script
from meshnet.model import Manifest
from meshnet.plan import LinkPlan, MacvlanPlan, NodeInfo, PodPlan, PodState, VxlanPlan, plan_pod, plan_remote_end
from meshnet.render import render

UNDERLAY = ipaddress.ip_network("198.51.100.0/24")
EXTERNAL_HOST = 254  # the external namespace's address on the underlay


# --- placement: which pod on which node, and the ADDs in order (also `meshnetctl lab`'s) ----------

@dataclass(frozen=True)
class LabLayout:
    """Where each pod of a manifest lives in an emulated cluster of namespaces."""

    nodes: tuple[NodeInfo, ...]
    pod_node: Mapping[str, str]  # "namespace/pod" -> node name
    pod_netns: Mapping[str, str]  # "namespace/pod" -> netns name


def pod_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def place_pods(manifest: Manifest, node_count: int) -> dict[str, int]:
    """Pods round-robin over nodes, unless a pod names `node<i>` in spec.nodeName."""
    placement: dict[str, int] = {}
    names = pod_names(manifest)
    explicit = {pod_key(p.namespace, p.name): p.node_name for p in manifest.pods if p.node_name}
    rr = 0
    for key in names:
        wanted = explicit.get(key, "")
        if wanted.startswith("node") and wanted[4:].isdigit() and int(wanted[4:]) < node_count:
            placement[key] = int(wanted[4:])
        else:
            placement[key] = rr % node_count
            rr += 1
    return placement


def pod_names(manifest: Manifest) -> list[str]:
    """Every pod of the manifest, as `namespace/name`, in manifest order."""
    return [pod_key(p.namespace, p.name) for p in manifest.pods]


def simulate_adds(manifest: Manifest, layout: LabLayout) -> list[tuple[str, PodPlan, list[VxlanPlan]]]:
    """Plan the ADD of every pod in order, as if each came up after the previous one.

    Returns per pod its plan and the remote vxlan ends its ADD makes peers build, so that every
    link is built exactly once — the same decisions the daemons make.
    """
    nodes = {n.name: n for n in layout.nodes}
    alive: dict[str, PodState] = {}
    out: list[tuple[str, PodPlan, list[VxlanPlan]]] = []
    for key in pod_names(manifest):
        ns, name = key.split("/", 1)
        node = nodes[layout.pod_node[key]]
        topo = manifest.topology(ns, name)
        me = PodState(name, True, node.name, node.vtep_ip, layout.pod_netns[key],
                      links=topo.links if topo is not None else ())
        if topo is None:
            alive[key] = me
            continue
        peers = {lnk.peer_pod: alive[pod_key(ns, lnk.peer_pod)] for lnk in topo.links
                 if pod_key(ns, lnk.peer_pod) in alive}
        plan = plan_pod(topo, me.netns, node, peers)
        remote_plans: list[VxlanPlan] = []
        for r in plan.remote:
            peer_topo = manifest.topology(ns, r.peer_pod)
            peer_key = pod_key(ns, r.peer_pod)
            if peer_topo is None:
                continue
            remote_plans.append(plan_remote_end(peer_topo, r.uid, layout.pod_netns[peer_key],
                                                nodes[layout.pod_node[peer_key]], me))
        alive[key] = me
        out.append((key, plan, remote_plans))
    return out


def every_link_plan(steps: Iterable[tuple[str, PodPlan, list[VxlanPlan]]]) -> list[LinkPlan]:
    result: list[LinkPlan] = []
    for _, plan, remote in steps:
        result.extend(plan.links)
        result.extend(remote)
    return result


# --- the dry-run lab ------------------------------------------------------------------------------

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
