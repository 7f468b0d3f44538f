"""Who may ask a daemon for what (meshnet.daemon.peer_auth): every rule, allowed and refused."""

from __future__ import annotations

import pytest

from meshnet.daemon.peer_auth import Caller, FarPod, authorize, parse_peer

VTEP_A, VTEP_B = "198.51.100.2", "198.51.100.3"
ALIVE_ON_A = FarPod("r2", True, "node-a", VTEP_A)
GONE = FarPod("r2", False, "", "")
MOVED_TO_B = FarPod("r2", True, "node-b", VTEP_B)


@pytest.mark.parametrize(("peer", "ip"), [
    ("ipv4:198.51.100.2:40000", "198.51.100.2"),
    ("ipv6:[2001:db8::1]:40000", "2001:db8::1"),
    ("ipv6:[::ffff:198.51.100.2]:40000", "198.51.100.2"),  # a dual-stack socket's view of IPv4
    ("ipv6:[fe80::1%eth0]:40000", "fe80::1"),
    ("unix:/run/x.sock", ""),
    ("ipv4:not-an-ip:1", ""),
    ("", ""),
])
def test_parse_peer(peer: str, ip: str) -> None:
    assert parse_peer(peer) == ip


@pytest.mark.parametrize("caller", [Caller(node="node-a"), Caller(address=VTEP_A),
                                    Caller(address="::ffff:198.51.100.2")],
                         ids=["certificate", "address", "mapped-address"])
def test_update_from_the_far_pods_node_is_allowed(caller: Caller) -> None:
    assert authorize("update", caller, ALIVE_ON_A, peer_vtep=VTEP_A).allowed


@pytest.mark.parametrize(("caller", "far", "vtep", "reason"), [
    (Caller(node="node-b"), ALIVE_ON_A, VTEP_A, "caller is node node-b, but pod r2 is on node node-a"),
    (Caller(address=VTEP_B), ALIVE_ON_A, VTEP_A, f"caller address {VTEP_B} is not VTEP {VTEP_A} of pod r2"),
    (Caller(node="node-a"), ALIVE_ON_A, VTEP_B, f"VTEP {VTEP_B} is not pod r2's ({VTEP_A})"),
    (Caller(address=VTEP_A), ALIVE_ON_A, VTEP_B, f"VTEP {VTEP_B} is not pod r2's"),
    (Caller(node="node-a"), GONE, VTEP_A, "pod r2 is not alive"),
    (Caller(node="node-a"), None, VTEP_A, "is not alive"),
    (Caller(), ALIVE_ON_A, VTEP_A, "neither a certificate nor an address"),
    # A far pod whose recorded VTEP is not an address never matches anything.
    (Caller(address="bogus"), FarPod("r2", True, "node-a", "bogus"), "bogus", "is not VTEP"),
], ids=["other-node-cert", "other-address", "cert-but-wrong-vtep", "address-but-wrong-vtep", "far-not-alive",
        "no-topology", "anonymous", "unparsable-vtep"])
def test_update_refused(caller: Caller, far: FarPod | None, vtep: str, reason: str) -> None:
    verdict = authorize("update", caller, far, peer_vtep=vtep)
    assert not verdict.allowed and reason in verdict.reason


@pytest.mark.parametrize(("caller", "far", "in_store"), [
    (Caller(node="node-a"), GONE, True),
    (Caller(address=VTEP_A), GONE, True),
    (Caller(address=VTEP_A), None, True),
    (Caller(node="node-a"), ALIVE_ON_A, False),  # the link left the spec
    (Caller(node="node-a"), MOVED_TO_B, True),  # a late DEL of the old incarnation on node-a
    (Caller(address=VTEP_A), MOVED_TO_B, True),
], ids=["gone-cert", "gone-address", "no-topology", "link-gone", "moved-cert", "moved-address"])
def test_remove_allowed(caller: Caller, far: FarPod | None, in_store: bool) -> None:
    assert authorize("remove", caller, far, peer_vtep=VTEP_A, link_in_store=in_store).allowed


@pytest.mark.parametrize(("caller", "far", "vtep", "reason"), [
    (Caller(node="node-a"), ALIVE_ON_A, VTEP_A, "pod r2 is alive on node node-a: its link is live"),
    (Caller(address=VTEP_A), ALIVE_ON_A, VTEP_A, "its link is live"),
    # Another node, authenticated, asking to remove the live end (which points at node-b).
    (Caller(node="node-a"), MOVED_TO_B, VTEP_B, "alive on node node-b"),
    # Without TLS only ends towards the caller's own address may go.
    (Caller(address=VTEP_B), GONE, VTEP_A, f"caller address {VTEP_B} cannot remove ends towards VTEP {VTEP_A}"),
    (Caller(), GONE, VTEP_A, "neither a certificate nor an address"),
], ids=["live-cert", "live-address", "live-elsewhere", "other-address", "anonymous"])
def test_remove_refused(caller: Caller, far: FarPod | None, vtep: str, reason: str) -> None:
    verdict = authorize("remove", caller, far, peer_vtep=vtep)
    assert not verdict.allowed and reason in verdict.reason
