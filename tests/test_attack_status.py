"""Issue 12, item 7: an attacker who holds one node's service account rewrites a pod's status, on a
real 3-node lab with real daemons (tests/3node.yml: r1, r2, r3 on node0, node1, node2).

Each round writes a forged status as r2's straight into the store the lab uses (as a raw write, the
way the API server would take a status from a stolen token: no client-side validation), restarts
r1 (a pod restart: DEL, new sandbox, ADD) and lets the reconcilers run. Then:

- the canary file an injected `netns exec ... touch` would create never appears;
- nothing outside the pods' namespaces changed: the interfaces of every node namespace and of the
  host namespace are compared with a snapshot taken before;
- every daemon keeps running;
- r1's link towards r2 is reported pending, its message naming r2 and the forged field, and r1's
  daemon logs every forged field;
and after the last round r2's status is written back honestly: every link pings again.

Several forged fields share a round where they cannot mask each other: each is refused on its own
(the log names all of them), the link's message names the first.

Forged peer requests against the real daemons are in test_daemon_integration.py
(`test_forged_peer_*`, `test_peer_requests_from_the_wrong_node_are_refused`) and, with TLS, in
test_peers_grpc.py; what those miss is at the end of this module.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnet import naming
from meshnet.daemon.config import DEFAULT_GRPC_PORT
from meshnet.lab.cluster import Lab
from meshnet.lab.processes import alive
from tests.labkit import failed_pings, lab_up

pytestmark = pytest.mark.root

TESTS = Path(__file__).parent
NS = "default"
ROOT = TESTS.parent
BRIDGE = "mnl0"  # the lab's eth0 bridge in each node namespace


def _links(netns: str | None) -> dict[str, tuple[Any, ...]]:
    argv = ["ip", "-j", "-d", "addr", "show"] if netns is None else ["ip", "-n", netns, "-j", "-d", "addr", "show"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    return {e["ifname"]: (e.get("ifindex"), e.get("linkinfo", {}).get("info_kind", ""),
                          tuple(sorted(f"{a.get('local')}/{a.get('prefixlen')}" for a in e.get("addr_info", ()))),
                          # the carrier's own coming and going aside (a bridge without an up
                          # port shows NO-CARRIER): nothing meshnet did
                          tuple(f for f in e.get("flags", ()) if f not in ("NO-CARRIER", "LOWER_UP")),
                          e.get("group"))
            for e in json.loads(out or "[]")
            # The bridge plugin's host ends of pods' eth0: a pod restart makes r1's anew, by design.
            if not (netns is not None and e.get("master") == BRIDGE
                    and e.get("linkinfo", {}).get("info_kind") == "veth")}


def outside_pods(lab: Lab) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Every interface of the host namespace and of each node namespace (not the pods')."""
    snap = {"host": _links(None)}
    for i in range(len(lab.state.nodes)):
        snap[lab.node_netns(i)] = _links(lab.node_netns(i))
    return snap


def forge(lab: Lab, pod: str, status: Any) -> None:
    """Write `status` as `pod`'s, raw, into the lab's store (with a change row: the watches see it)."""
    db_path = lab.state.store_url.removeprefix("sqlite://")
    text = json.dumps(status)
    db = sqlite3.connect(db_path, timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        cur = db.execute("INSERT INTO change (type, namespace, name, spec, status) VALUES ('MODIFIED', ?, ?, NULL, ?)",
                         (NS, pod, text))
        db.execute("UPDATE topology SET status = ?, resource_version = ? WHERE namespace = ? AND name = ?",
                   (text, cur.lastrowid, NS, pod))
        db.execute("COMMIT")
    finally:
        db.close()


def raw_status(lab: Lab, pod: str) -> dict[str, Any]:
    db = sqlite3.connect(lab.state.store_url.removeprefix("sqlite://"), timeout=10)
    try:
        (text,) = db.execute("SELECT status FROM topology WHERE namespace = ? AND name = ?", (NS, pod)).fetchone()
    finally:
        db.close()
    return dict(json.loads(text))


def link_message(lab: Lab, pod: str, uid: int) -> tuple[str, str]:
    for s in raw_status(lab, pod).get("links", ()):
        if s.get("uid") == uid:
            return str(s.get("state", "")), str(s.get("message", ""))
    return "", ""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with lab_up(tmp_path_factory.mktemp("attack"), TESTS / "3node.yml", nodes=3) as the_lab:
        assert {p: r.node for p, r in the_lab.state.pods.items()} == {"r1": "node0", "r2": "node1", "r3": "node2"}
        yield the_lab


def rounds(lab: Lab, canary: Path) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(name, forged fields, the fields the refusal must name — the first one in the link message)."""
    inject = f"\n[.] netns exec {lab.node_netns(1)} touch {canary}"
    eth0 = {"uid": 1, "kind": "vxlan", "state": "up", "intf": "eth0"}  # the node's and the pod's real eth0
    return [
        ("line-breaks", {"src_ip": "198.51.100.2" + inject, "container_id": "c0ffee\nlink del eth0",
                         "skipped": [{"pod_name": "r1\nr3", "link_id": 1}]},
         ["status.src_ip", "status.container_id", "status.skipped[0].pod_name"]),
        ("paths-and-options", {"net_ns": f"/var/run/netns/x{inject}", "node": "-x", "links": [eth0]},
         ["status.net_ns", "status.node", "status.links[0].intf"]),
        ("host-namespace", {"net_ns": "/proc/1/ns/net", "vni_block": 2 ** 40,
                            "links": [{"uid": 1, "kind": "vxlan", "state": "up", "intf": "eth1 eth0"}]},
         ["status.net_ns", "status.vni_block", "status.links[0].intf"]),
        ("outside-and-types", {"net_ns": "/etc/passwd", "plumbing_error": 7, "links": "up"},
         ["status.net_ns", "status.plumbing_error", "status.links"]),
        ("huge-and-spaces", {"src_ip": "1" * (1 << 20), "node": "node 1",
                             "links": [{"uid": 1, "kind": "vxlan", "state": "up", "intf": "e" * 64}]},
         ["status.src_ip", "status.node", "status.links[0].intf"]),
    ]


def daemons_alive(lab: Lab) -> dict[str, bool]:
    return {node: alive(pid) for node, pid in lab.state.daemons.items()}


def wait_for(what: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_forged_statuses_touch_nothing_outside_the_pods_and_the_lab_converges_again(lab: Lab, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    honest = raw_status(lab, "r2")
    before = outside_pods(lab)
    node0_log = lab.dir / "node0.log"
    for name, forged, fields in rounds(lab, canary):
        forge(lab, "r2", {**honest, **forged})
        lab.restart_pod("r1")

        want = f"peer pod r2's status is refused: Topology default/r2: {fields[0]}: "

        def reported(want: str = want) -> bool:
            state, message = link_message(lab, "r1", 1)
            return state == "pending" and want in message

        assert wait_for(reported), (name, link_message(lab, "r1", 1))
        log = node0_log.read_text(errors="replace")
        for field in fields:
            assert f"Topology default/r2: {field}: " in log, (name, field)
        assert not canary.exists(), name
        assert outside_pods(lab) == before, name
        assert all(daemons_alive(lab).values()), (name, daemons_alive(lab))
        # r1's other link (to r3, honest) is unaffected.
        assert link_message(lab, "r1", 2)[0] == "up", (name, link_message(lab, "r1", 2))

    # Written back honestly (as r2's daemon would on its pod's next ADD): every link again.
    forge(lab, "r2", honest)
    assert wait_for(lambda: link_message(lab, "r1", 1)[0] == "up" and failed_pings(lab) == [], 20.0), \
        (link_message(lab, "r1", 1), failed_pings(lab))
    assert not canary.exists()
    assert outside_pods(lab) == before


def test_a_well_formed_status_naming_another_namespace_is_not_followed(lab: Lab) -> None:
    """net_ns passes every rule but names r2's node's own namespace (or r3's sandbox): the daemons
    use only the namespace the CNI ADD gave them, so nothing there changes and the links keep
    working; with another container id, r2's own daemon does not vouch for it and touches nothing."""
    honest = raw_status(lab, "r2")
    before = outside_pods(lab)
    r3_before = _links(lab.pod_netns("r3"))
    try:
        for net_ns in (f"/var/run/netns/{lab.node_netns(1)}", f"/var/run/netns/{lab.pod_netns('r3')}"):
            forge(lab, "r2", {**honest, "net_ns": net_ns,
                              # the node's eth0 bridge: a name garbage collection once took from status
                              "links": [{"uid": 1, "kind": "vxlan", "state": "up", "intf": BRIDGE},
                                        {"uid": 3, "kind": "vxlan", "state": "up", "intf": "eth2"}]})
            lab.restart_pod("r1")
            assert wait_for(lambda: failed_pings(lab) == [], 10.0), failed_pings(lab)
            forge(lab, "r2", {**honest, "net_ns": net_ns, "container_id": "ffffffff"})
            lab.restart_daemon("node1")  # a restart re-reads everything: still nothing outside r2
            lab.wait_daemon("node1")
            assert outside_pods(lab) == before
            assert _links(lab.pod_netns("r3")).keys() == r3_before.keys()
            assert all(daemons_alive(lab).values())
    finally:
        forge(lab, "r2", honest)
        lab.restart_pod("r2")
    assert wait_for(lambda: failed_pings(lab) == [], 20.0), failed_pings(lab)


# --- forged peer requests the integration tests do not cover -----------------------------------------

FORGE = """
import json, sys
from meshnet.daemon.peer_client import PeerError, PeerLink
from meshnet.daemon.peers import GrpcPeerClient
client = GrpcPeerClient()
try:
    method = getattr(client, sys.argv[3])
    print(json.dumps({"action": method(sys.argv[1], PeerLink(**json.loads(sys.argv[2])))}))
except PeerError as e:
    print(json.dumps({"error": str(e)}))
"""


def peer_request(lab: Lab, from_netns: str, to_node: int, link: dict[str, Any], method: str) -> dict[str, str]:
    argv = ["ip", "netns", "exec", from_netns, sys.executable, "-c", FORGE,
            f"{lab.node_info(to_node).vtep_ip}:{DEFAULT_GRPC_PORT}", json.dumps(link), method]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True, timeout=60, env=env)
    return dict(json.loads(proc.stdout))


def r2_end_of_link1(lab: Lab) -> dict[str, Any]:
    """What node0 (r1's) sends node1 for link 1 (r1 eth1 - r2 eth1)."""
    return {"namespace": NS, "pod": "r2", "peer_pod": "r1", "uid": 1,
            "vni": naming.vni(NS, 1, raw_status(lab, "r1").get("vni_block") or naming.vni_block(NS)),
            "local_intf": "eth1", "peer_intf": "eth1", "local_ip": "12.12.12.2/24", "peer_ip": "12.12.12.1/24",
            "peer_vtep": lab.node_info(0).vtep_ip}


def test_forged_peer_requests_change_nothing(lab: Lab) -> None:
    """From the third node (wrong caller), with a wrong VNI, a Remove of the live link from its own
    node: all refused, r2's end stays (same ifindex) and the link answers."""
    assert wait_for(lambda: failed_pings(lab) == [], 20.0), failed_pings(lab)
    r2 = lab.pod_netns("r2")
    before = _links(r2)
    honest = r2_end_of_link1(lab)
    answers = {
        "wrong-caller": peer_request(lab, lab.node_netns(2), 1, honest, "update"),
        "wrong-caller-remove": peer_request(lab, lab.node_netns(2), 1, honest, "remove"),
        "wrong-vni": peer_request(lab, lab.node_netns(0), 1, {**honest, "vni": honest["vni"] + 1}, "update"),
        "remove-live": peer_request(lab, lab.node_netns(0), 1, honest, "remove"),
    }
    for what, answer in answers.items():
        assert "PERMISSION_DENIED" in answer.get("error", ""), (what, answer)
    assert _links(r2) == before
    assert failed_pings(lab) == []
    assert all(daemons_alive(lab).values())


# --- an unauthenticated client against a real daemon with mutual TLS ----------------------------------

TLS_CLIENT = """
import json, sys
from meshnet.daemon.config import TlsPaths
from meshnet.daemon.peer_client import PeerError, PeerLink
from meshnet.daemon.peers import GrpcPeerClient
tls = TlsPaths(*sys.argv[2:5]) if len(sys.argv) > 2 else None
link = PeerLink("default", "r2", "r1", 1, 2621441, "eth1", "eth1", "12.12.12.2/24", "12.12.12.1/24", "127.0.0.1")
try:
    print(json.dumps({"action": GrpcPeerClient(timeout=3, tls=tls).update(sys.argv[1], link)}))
except PeerError as e:
    print(json.dumps({"error": str(e)}))
"""


def test_a_real_tls_daemon_refuses_clients_without_a_cluster_certificate(tmp_path: Path) -> None:
    from meshnet import pki
    from meshnet.daemon.api import health_check
    from tests.netns import netns_set

    certs = tmp_path / "pki"
    pki.ensure(certs, {"node-a": ["127.0.0.1"], "node-b": ["127.0.0.1"]})
    pki.ensure(certs / "other", {"node-b": ["127.0.0.1"]})
    sock = tmp_path / "d.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with netns_set(1) as (ns,):
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        log = open(tmp_path / "d.log", "wb")  # noqa: SIM115 - handed to the child
        daemon = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "meshnet.daemon.main", "--node-name", "node-a",
             "--single-node", "--socket", str(sock), "--store", f"sqlite://{tmp_path / 's.db'}",
             "--grpc-bind", "127.0.0.1", "--tls-ca", str(certs / pki.CA_CERT),
             "--tls-cert", str(pki.node_cert(certs, "node-a")), "--tls-key", str(pki.node_key(certs, "node-a"))],
            stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        try:
            assert wait_for(lambda: sock.exists() and health_check(str(sock), timeout=1.0).get("ready"), 20.0), \
                (tmp_path / "d.log").read_text()

            def client(*tls: Path) -> dict[str, str]:
                argv = ["ip", "netns", "exec", ns, sys.executable, "-c", TLS_CLIENT,
                        f"127.0.0.1:{DEFAULT_GRPC_PORT}", *map(str, tls)]
                out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60, env=env).stdout
                return dict(json.loads(out))

            plain = client()
            other_ca = client(certs / "other" / pki.CA_CERT, pki.node_cert(certs / "other", "node-b"),
                              pki.node_key(certs / "other", "node-b"))
            member = client(certs / pki.CA_CERT, pki.node_cert(certs, "node-b"), pki.node_key(certs, "node-b"))
            assert "UNAVAILABLE" in plain.get("error", "") or "DEADLINE" in plain.get("error", ""), plain
            assert "error" in other_ca and "PERMISSION_DENIED" not in other_ca["error"], other_ca
            # A cluster certificate reaches the core, which still refuses what the store does not back.
            assert "PERMISSION_DENIED" in member.get("error", ""), member
            assert daemon.poll() is None
            log_text = (tmp_path / "d.log").read_text()
            assert log_text.count("peer-update-denied") == 1, log_text  # only the member got that far
        finally:
            daemon.terminate()
            daemon.wait(timeout=20)
