"""Who may ask this daemon to build or remove a vxlan end: a pure decision over the caller's
identity and what the store says about the far pod (the caller's pod).

The gRPC edge (peers.py) learns the caller: the node name of its client certificate when the
daemons use mutual TLS, else only the address it connects from. The store already backs the link
itself (core's `_backed`); this adds the question the store cannot answer alone: is the caller the
node that hosts the far pod? Without it any node (or anyone reaching the port) could build ends
towards itself or tear down live links (a repeatable flap).

No I/O and no gRPC here: everything is handed in, so every rule is unit-tested.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from meshnet.model import Topology

Kind = Literal["update", "remove"]


@dataclass(frozen=True)
class Caller:
    """A peer request's sender: `node` from its verified certificate ("" without TLS), `address`
    the IP it connects from ("" when unknown, e.g. a unix socket)."""

    node: str = ""
    address: str = ""

    def __str__(self) -> str:
        return f"node {self.node}" if self.node else f"address {self.address or 'unknown'}"


@dataclass(frozen=True)
class FarPod:
    """The far pod (the caller's) as the store records it; status values already parsed strictly."""

    name: str
    alive: bool
    node: str
    src_ip: str  # the VTEP its node recorded


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


ALLOW = Decision(True)


def parse_peer(peer: str) -> str:
    """The IP address of a gRPC `context.peer()` string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5"), or ""."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]").split("%", 1)[0]
    else:
        return ""
    return _ip(host)


def _ip(value: str) -> str:
    """A canonical address (IPv4-mapped IPv6 as IPv4), or "" for anything that is not one."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _same_ip(a: str, b: str) -> bool:
    return bool(a) and _ip(a) != "" and _ip(a) == _ip(b)


def _is_far_node(caller: Caller, far: FarPod) -> Decision:
    """The caller is the node that hosts `far`: by certificate, or by the VTEP the store records."""
    if caller.node:
        if caller.node == far.node:
            return ALLOW
        return Decision(False, f"caller is node {caller.node}, but pod {far.name} is on node {far.node or 'none'}")
    if _same_ip(caller.address, far.src_ip):
        return ALLOW
    return Decision(False, f"caller {caller} is not VTEP {far.src_ip or 'none'} of pod {far.name}")


def authorize(kind: Kind, caller: Caller, far: FarPod | None, *, peer_vtep: str,
              link_in_store: bool = True) -> Decision:
    """May `caller` make this node build (update) or remove its end of a link whose far pod is `far`
    (None: no such Topology), the request naming the far end's VTEP `peer_vtep`?

    - update: only the node hosting the far pod, and only towards the VTEP the store records for it.
    - remove: only when the store shows the link gone, or the far pod not alive (any more) as the
      caller's — never a live link. Without TLS the end removed must point at the caller's address
      (core removes only ends whose remote is `peer_vtep`), so nobody removes another node's ends.
    """
    if not caller.node and not caller.address:
        return Decision(False, "caller has neither a certificate nor an address")
    if kind == "update":
        if far is None or not far.alive or not far.node:
            return Decision(False, f"pod {far.name if far else '?'} is not alive in the store")
        verdict = _is_far_node(caller, far)
        if not verdict.allowed:
            return verdict
        if not _same_ip(peer_vtep, far.src_ip):
            return Decision(False, f"VTEP {peer_vtep} is not pod {far.name}'s ({far.src_ip or 'none'})")
        return ALLOW
    if not caller.node and not _same_ip(caller.address, peer_vtep):
        return Decision(False, f"caller {caller} cannot remove ends towards VTEP {peer_vtep}")
    if not link_in_store or far is None or not far.alive:
        return ALLOW
    if _same_ip(peer_vtep, far.src_ip) or (caller.node and caller.node == far.node):
        return Decision(False, f"pod {far.name} is alive on node {far.node}: its link is live")
    return ALLOW  # the far pod lives elsewhere now: the caller's incarnation of it is gone


class PeerRequest(Protocol):
    """What a rule needs of a peer request (core's PeerLink)."""

    @property
    def namespace(self) -> str: ...
    @property
    def pod(self) -> str: ...
    @property
    def peer_pod(self) -> str: ...
    @property
    def uid(self) -> int: ...
    @property
    def peer_vtep(self) -> str: ...


def far_pod_of(topo: Topology | None) -> FarPod | None:
    if topo is None:
        return None
    st = topo.status
    return FarPod(topo.name, st.alive, st.node, st.src_ip)


def authorize_batch(kind: Kind, caller: Caller, reqs: Iterable[PeerRequest],
                    far_pod: Callable[[str, str], FarPod | None],
                    gone: Collection[tuple[str, str, int]] = ()) -> Decision:
    """`authorize` for each request of a batch (the far pod looked up once each): the first refusal,
    naming the link, refuses the whole batch — a forged request never rides along with honest ones.
    `gone`: links (namespace, pod, uid) the store shows deleted from the spec."""
    seen: dict[tuple[str, str], FarPod | None] = {}
    for req in reqs:
        key = (req.namespace, req.peer_pod)
        if key not in seen:
            seen[key] = far_pod(*key)
        verdict = authorize(kind, caller, seen[key], peer_vtep=req.peer_vtep,
                            link_in_store=(req.namespace, req.pod, req.uid) not in gone)
        if not verdict.allowed:
            return Decision(False, f"{kind} of link uid {req.uid} of {req.namespace}/{req.pod} from {caller}: "
                                   f"{verdict.reason}")
    return ALLOW
