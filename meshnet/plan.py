"""Pure link planning: (pod, its Topology, peer states, node) → what to build, and where.

No I/O. The daemon feeds it the store's view; `meshnetctl plan` feeds it a simulated sequence of
ADDs (`meshnet.dryrun.simulate_adds`). Both get the same decisions, so the dry-run script is
exactly what the daemons execute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Literal

from meshnet import naming
from meshnet.model import Impairments, IPInterface, Link, Topology

# The kernel's VXLAN over IPv4 header overhead: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
VXLAN_OVERHEAD = 50
DEFAULT_MTU = 1500


MACVLAN_PARENTS_SETTING = "--macvlan-parents (env MACVLAN_PARENTS)"
ANY_PARENT = "*"


@dataclass(frozen=True)
class NodeInfo:
    """Where node-level commands run: the node's own namespace (None: the executor's current one)."""

    name: str
    vtep_ip: str
    uplink: str
    netns: str | None = None
    uplink_mtu: int = DEFAULT_MTU
    # Host interfaces macvlan links may use: the operator's allow-list ("*": any but `uplink`).
    # None only where no operator decides (the dry-run's simulated cluster): anything goes.
    macvlan_parents: frozenset[str] | None = None


class MacvlanParentRefused(Exception):
    """A Topology asks for a macvlan on a host interface the node's allow-list does not hold."""


def macvlan_parent_problem(parent: str, node: NodeInfo) -> str | None:
    """Why `parent` may not carry a macvlan on `node`, or None. The underlay (VTEP) interface only
    when listed by name: a pod on it could reach every node's VXLAN traffic."""
    allowed = node.macvlan_parents
    if allowed is None or parent in allowed or (ANY_PARENT in allowed and parent != node.uplink):
        return None
    listed = ",".join(sorted(allowed)) or "none"
    underlay = " (the node's underlay interface: it must be listed by name)" if parent == node.uplink else ""
    return (f"host interface {parent}{underlay} is not an allowed macvlan parent on node {node.name}; "
            f"{MACVLAN_PARENTS_SETTING} allows: {listed}")


def check_macvlan_parents(topo: Topology, node: NodeInfo) -> None:
    """Raise MacvlanParentRefused for the first macvlan link of `topo` whose parent is refused."""
    for link in topo.links:
        why = macvlan_parent_problem(link.peer_intf, node) if link.is_macvlan else None
        if why:
            raise MacvlanParentRefused(f"{topo.namespace}/{topo.name} link uid {link.uid}: {why}")


@dataclass(frozen=True)
class PodState:
    """What the store says about a pod (any pod: a link's peer, a caller, the pod itself): alive or
    not, on which node, reachable through which VTEP."""

    name: str
    alive: bool
    node: str = ""
    src_ip: str = ""
    netns: str = ""  # the iproute2 name of its network namespace
    vni_block: int = 0  # the VNI block it recorded (naming.link_block)
    # Why its status was refused (model.TopologyStatus.problems): such a pod is never alive.
    problems: tuple[str, ...] = ()
    # Its Topology's links, when known: a veth is built whole by whichever ADD comes second, and
    # the far end's own choices (state, impairments, extra addresses, MAC) are in the peer's spec.
    links: tuple[Link, ...] = ()

    def link(self, uid: int) -> Link | None:
        return self._by_uid.get(uid)

    @cached_property
    def _by_uid(self) -> dict[int, Link]:
        # Planning looks each link's far end up by uid: O(1), not a scan per link (1500 links).
        return {lnk.uid: lnk for lnk in self.links}

    @classmethod
    def from_topology(cls, topo: Topology, netns: str = "") -> PodState:
        """The pod as its (validated) status describes it; `netns`: its iproute2 name, if known."""
        st = topo.status
        return cls(topo.name, st.alive, st.node, st.src_ip, netns, st.vni_block, st.problems, topo.links)


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


@lru_cache(maxsize=256)
def pending_reason(peer_pod: str) -> str:
    """Why a link waits: recorded in its status by the plan and by the daemon alike, byte for byte
    (a status that differs only in this text would be written again on every pass). One string per
    peer pod: a plan of 1500 links towards one pod not up yet held 1500 copies of it."""
    return f"peer pod {peer_pod} is not up yet"


# Slotted, unlike the link plans (render's recipes read those through their __dict__).
@dataclass(frozen=True, slots=True)
class Pending:
    """A link that cannot be built now: its peer is not alive yet (the peer's ADD will build it)."""

    uid: int
    peer_pod: str
    reason: str


@dataclass(frozen=True, slots=True)
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
              peer: PodState | None) -> LinkPlan | Pending | tuple[VxlanPlan, RemoteEnd]:
    """Decide one link of pod `topo.name` (namespace `netns`, on `node`)."""
    if link.is_macvlan:
        # A refused parent fails the pod's ADD (check_macvlan_parents); a spec changed later while
        # the pod runs leaves the link pending with the reason, never built.
        why = macvlan_parent_problem(link.peer_intf, node)
        if why:
            return Pending(link.uid, link.peer_pod, why)
        return MacvlanPlan(link.uid, endpoint(netns, topo.namespace, topo.name, link), link.peer_intf, node.netns,
                           link.mtu)
    if peer is not None and peer.problems:
        # A refused status (forged or corrupt) never reaches a command; the link says why it waits.
        return Pending(link.uid, link.peer_pod, f"peer pod {link.peer_pod}'s status is refused: {peer.problems[0]}")
    if peer is None or not peer.alive:
        return Pending(link.uid, link.peer_pod, pending_reason(link.peer_pod))
    # Made only for a link that is built: a pod whose peers are not up yet (every link pending,
    # e.g. 1500 of them at the first ADD of two) pays no MAC digest per link.
    local = endpoint(netns, topo.namespace, topo.name, link)
    if peer.node == node.name:
        theirs = peer.link(link.uid)
        if theirs is not None and theirs.local_intf == link.peer_intf and theirs.peer_pod == topo.name:
            far = endpoint(peer.netns, topo.namespace, link.peer_pod, theirs)
        else:
            # The peer's spec is unknown here (or not mirrored yet): its end gets the defaults.
            far = Endpoint(peer.netns, link.peer_intf, link.peer_ip,
                           naming.mac_address(topo.namespace, link.peer_pod, link.peer_intf))
        return VethPlan(link.uid, local, far, node.netns, link.mtu or DEFAULT_MTU)
    theirs = peer.link(link.uid)
    if theirs is not None and theirs.state == "down" and theirs.peer_pod == topo.name:
        # A vxlan device hears nothing of its remote's state: a far end declared down takes this
        # end down too, so both sides lose carrier, as with a pulled cable (docs/links.md).
        local = replace(local, state="down")
    block = naming.link_block(topo.namespace, topo.status.vni_block, peer.vni_block)
    plan = VxlanPlan(link.uid, local, naming.vni(topo.namespace, link.uid, block), peer.src_ip, node.vtep_ip,
                     node.uplink, node.netns, vxlan_mtu(link, node))
    return plan, RemoteEnd(link.uid, link.peer_pod, peer.node, peer.src_ip)


def plan_pod(topo: Topology, netns: str, node: NodeInfo, peers: Mapping[str, PodState]) -> PodPlan:
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


def plan_remote_end(topo: Topology, uid: int, netns: str, node: NodeInfo, caller: PodState) -> VxlanPlan:
    """The vxlan end on this node for link `uid` of local pod `topo`, whose peer `caller` is remote."""
    link = topo.link(uid)
    if link is None or link.is_macvlan:
        raise KeyError(uid)
    decision = plan_link(topo, link, netns, node, caller)
    if not isinstance(decision, tuple):
        raise ValueError(f"link uid {uid} of {topo.name} is not a vxlan towards {caller.name}")
    return decision[0]
