"""Pure link planning: (pod, its Topology, peer states, node) → what to build, and where.

No I/O. The daemon feeds it the store's view; `meshnetctl plan` feeds it a simulated sequence of
ADDs. Both get the same decisions, so the dry-run script is exactly what the daemons execute.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from meshnet import naming
from meshnet.model import Impairments, IPInterface, Link, Manifest, Topology

# The kernel's VXLAN over IPv4 header overhead: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
VXLAN_OVERHEAD = 50
DEFAULT_MTU = 1500


@dataclass(frozen=True)
class NodeInfo:
    """Where node-level commands run: the node's own namespace (None: the executor's current one)."""

    name: str
    vtep_ip: str
    uplink: str
    netns: str | None = None
    uplink_mtu: int = DEFAULT_MTU


@dataclass(frozen=True)
class PeerState:
    """What the store says about a pod: alive or not, on which node, reachable through which VTEP."""

    name: str
    alive: bool
    node: str = ""
    src_ip: str = ""
    netns: str = ""  # the iproute2 name of its network namespace
    vni_block: int = 0  # the VNI block it recorded (naming.link_block)
    # Its Topology's links, when known: a veth is built whole by whichever ADD comes second, and
    # the far end's own choices (state, impairments, extra addresses, MAC) are in the peer's spec.
    links: tuple[Link, ...] = ()

    def link(self, uid: int) -> Link | None:
        return next((lnk for lnk in self.links if lnk.uid == uid), None)


@dataclass(frozen=True)
class Capabilities:
    """What this node's kernel offers link ends (executor.Executor.capabilities detects it)."""

    netem: bool = True


ALL_CAPABILITIES = Capabilities()


@dataclass(frozen=True)
class Endpoint:
    netns: str
    intf: str
    ip: IPInterface | None
    mac: str = ""
    ips: tuple[IPInterface, ...] = ()  # local_ips: addresses beside `ip`
    state: str = "up"  # administrative: "down" keeps the interface, carrier off at the far end
    impairments: Impairments | None = None  # on traffic leaving this end

    @property
    def addresses(self) -> tuple[IPInterface, ...]:
        return ((self.ip,) if self.ip is not None else ()) + self.ips


def endpoint(netns: str, namespace: str, pod: str, link: Link) -> Endpoint:
    """Pod `pod`'s end of `link` as its own Topology declares it."""
    mac = link.local_mac or naming.mac_address(namespace, pod, link.local_intf)
    return Endpoint(netns, link.local_intf, link.local_ip, mac, link.local_ips, link.state, link.impairments)


@dataclass(frozen=True)
class VethPlan:
    uid: int
    a: Endpoint
    b: Endpoint
    node_netns: str | None
    mtu: int
    kind: Literal["veth"] = "veth"

    @property
    def ends(self) -> tuple[Endpoint, ...]:
        return (self.a, self.b)


@dataclass(frozen=True)
class VxlanPlan:
    uid: int
    local: Endpoint
    vni: int
    remote_ip: str
    vtep_ip: str
    uplink: str
    node_netns: str | None
    mtu: int
    port: int = naming.VXLAN_PORT
    kind: Literal["vxlan"] = "vxlan"

    @property
    def ends(self) -> tuple[Endpoint, ...]:
        return (self.local,)


@dataclass(frozen=True)
class MacvlanPlan:
    uid: int
    local: Endpoint
    parent: str
    node_netns: str | None
    mtu: int | None
    kind: Literal["macvlan"] = "macvlan"

    @property
    def ends(self) -> tuple[Endpoint, ...]:
        return (self.local,)


LinkPlan = VethPlan | VxlanPlan | MacvlanPlan


@dataclass(frozen=True)
class Pending:
    """A link that cannot be built now: its peer is not alive yet (the peer's ADD will build it)."""

    uid: int
    peer_pod: str
    reason: str


@dataclass(frozen=True)
class RemoteEnd:
    """A vxlan end the peer's node must build (or update) once this pod's end exists."""

    uid: int
    peer_pod: str
    peer_node: str
    peer_src_ip: str


@dataclass(frozen=True)
class PodPlan:
    links: tuple[LinkPlan, ...]
    pending: tuple[Pending, ...]
    remote: tuple[RemoteEnd, ...]


def vxlan_mtu(link: Link, node: NodeInfo) -> int:
    return link.mtu or node.uplink_mtu - VXLAN_OVERHEAD


def plan_link(topo: Topology, link: Link, netns: str, node: NodeInfo,
              peer: PeerState | None) -> LinkPlan | Pending | tuple[VxlanPlan, RemoteEnd]:
    """Decide one link of pod `topo.name` (namespace `netns`, on `node`)."""
    local = endpoint(netns, topo.namespace, topo.name, link)
    if link.is_macvlan:
        return MacvlanPlan(link.uid, local, link.peer_intf, node.netns, link.mtu)
    if peer is None or not peer.alive:
        return Pending(link.uid, link.peer_pod, f"peer pod {link.peer_pod} is not up yet")
    if peer.node == node.name:
        theirs = peer.link(link.uid)
        if theirs is not None and theirs.local_intf == link.peer_intf and theirs.peer_pod == topo.name:
            far = endpoint(peer.netns, topo.namespace, link.peer_pod, theirs)
        else:
            # The peer's spec is unknown here (or not mirrored yet): its end gets the defaults.
            far = Endpoint(peer.netns, link.peer_intf, link.peer_ip,
                           naming.mac_address(topo.namespace, link.peer_pod, link.peer_intf))
        return VethPlan(link.uid, local, far, node.netns, link.mtu or DEFAULT_MTU)
    block = naming.link_block(topo.namespace, topo.status.vni_block, peer.vni_block)
    plan = VxlanPlan(link.uid, local, naming.vni(topo.namespace, link.uid, block), peer.src_ip, node.vtep_ip,
                     node.uplink, node.netns, vxlan_mtu(link, node))
    return plan, RemoteEnd(link.uid, link.peer_pod, peer.node, peer.src_ip)


def plan_pod(topo: Topology, netns: str, node: NodeInfo, peers: Mapping[str, PeerState]) -> PodPlan:
    """Every link of one pod, given the state of its peers."""
    links: list[LinkPlan] = []
    pending: list[Pending] = []
    remote: list[RemoteEnd] = []
    for link in topo.links:
        decision = plan_link(topo, link, netns, node, peers.get(link.peer_pod))
        if isinstance(decision, Pending):
            pending.append(decision)
        elif isinstance(decision, tuple):
            links.append(decision[0])
            remote.append(decision[1])
        else:
            links.append(decision)
    return PodPlan(tuple(links), tuple(pending), tuple(remote))


def plan_remote_end(topo: Topology, uid: int, netns: str, node: NodeInfo, caller: PeerState) -> VxlanPlan:
    """The vxlan end on this node for link `uid` of local pod `topo`, whose peer `caller` is remote."""
    link = topo.link(uid)
    if link is None or link.is_macvlan:
        raise KeyError(uid)
    decision = plan_link(topo, link, netns, node, caller)
    if not isinstance(decision, tuple):
        raise ValueError(f"link uid {uid} of {topo.name} is not a vxlan towards {caller.name}")
    return decision[0]


# --- the emulated cluster of `meshnetctl plan` -----------------------------------------------------

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
    alive: dict[str, PeerState] = {}
    out: list[tuple[str, PodPlan, list[VxlanPlan]]] = []
    for key in pod_names(manifest):
        ns, name = key.split("/", 1)
        node = nodes[layout.pod_node[key]]
        topo = manifest.topology(ns, name)
        me = PeerState(name, True, node.name, node.vtep_ip, layout.pod_netns[key],
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
