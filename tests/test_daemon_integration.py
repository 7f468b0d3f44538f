"""meshnetd end to end, per store: nodes are namespaces with one real meshnetd each, the real shim is
executed like a kubelet executes a CNI plugin (env + config on stdin) and delegates eth0 to the real
`bridge` + `host-local`. Ping proves every link.

One lab per store serves every scenario of this module; each scenario has its own pods, so they do
not disturb each other.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshnet import naming
from meshnet.command import Command
from meshnet.daemon.config import DEFAULT_GRPC_PORT
from meshnet.daemon.netns import NETNS_DIR
from meshnet.lab.cluster import Lab
from meshnet.model import Topology
from meshnet.store import open_store
from tests.kubeapi.server import KubeApiServer
from tests.labkit import failed_pings, lab_up

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
NS = "default"

# (pod, node) and (uid, pod, intf, ip, peer, peer intf, peer ip); "localhost" = macvlan on eth0.
PODS = {"a": 0, "b": 0, "c": 1, "m": 1, "e": 0, "p1": 0, "q1": 1, "p2": 0, "q2": 0, "r": 0, "s": 1,
        "u": 0, "v": 1, "w": 0, "x": 0, "y": 0, "z": 1}
LINKS = [
    (1, "a", "eth1", "10.1.1.1/24", "b", "eth1", "10.1.1.2/24"),  # same node: veth
    (2, "a", "eth2", "10.1.2.1/24", "c", "eth3", "10.1.2.2/24"),  # across nodes: vxlan
    (3, "m", "eth1", "10.1.3.5/24", "localhost", "eth0", ""),  # macvlan on node1's eth0
    (4, "a", "eth4", "10.1.4.1/24", "ghost", "eth1", "10.1.4.2/24"),  # ghost: a Topology without pod
    (5, "p1", "eth1", "10.1.5.1/24", "q1", "eth1", "10.1.5.2/24"),
    (6, "p2", "eth1", "10.1.6.1/24", "q2", "eth1", "10.1.6.2/24"),
    (7, "r", "eth1", "10.1.7.1/24", "s", "eth1", "10.1.7.2/24"),
    (8, "u", "eth1", "10.1.8.1/24", "v", "eth1", "10.1.8.2/24"),
    (9, "w", "eth1", "10.1.9.1/24", "x", "eth1", "10.1.9.2/24"),
    (10, "y", "eth1", "10.1.10.1/24", "z", "eth1", "10.1.10.2/24"),
]  # e is a pod without Topology


def manifest() -> str:
    links: dict[str, list[dict[str, Any]]] = {}
    for uid, pod, intf, ip, peer, peer_intf, peer_ip in LINKS:
        addrs = {**({"local_ip": ip} if ip else {}), **({"peer_ip": peer_ip} if peer_ip else {})}
        links.setdefault(pod, []).append({"uid": uid, "peer_pod": peer, "local_intf": intf, "peer_intf": peer_intf,
                                          **addrs})
        if peer != "localhost":
            links.setdefault(peer, []).append({"uid": uid, "peer_pod": pod, "local_intf": peer_intf,
                                               "peer_intf": intf, "local_ip": peer_ip, "peer_ip": ip})
    docs = [{"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": {"name": pod},
             "spec": {"links": lnks}} for pod, lnks in links.items()]
    docs += [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
              "spec": {"nodeName": f"node{node}", "containers": [{"name": "c", "image": "alpine:3"}]}}
             for pod, node in PODS.items()]
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


@pytest.fixture(scope="module", params=["sqlite", "kube"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("lab")
    if request.param == "sqlite":
        with lab_up(tmp, manifest(), nodes=2) as the_lab:
            yield the_lab
        return
    # The kube_api fixture is per test; one server serves this module's whole lab.
    with KubeApiServer() as api, lab_up(tmp, manifest(), nodes=2, store="kube", kubeconfig=api.kubeconfig) as the_lab:
        yield the_lab
    assert not api.errors, "the kube API test server crashed:\n" + "\n".join(api.errors)


# --- helpers --------------------------------------------------------------------------------------

def pod_ns(lab: Lab, pod: str) -> str:
    return lab.pod_netns(pod)


def ifnames(lab: Lab, pod: str) -> dict[str, int]:
    """{ifname: ifindex} in the pod's namespace."""
    return {name: int(e["ifindex"]) for name, e in lab.kernel_links(pod_ns(lab, pod)).items()}


def ping(lab: Lab, pod: str, address: str) -> bool:
    argv = ["ip", "netns", "exec", pod_ns(lab, pod), "ping", "-c1", "-W1", address]
    return any(subprocess.run(argv, capture_output=True, check=False, timeout=10).returncode == 0 for _ in range(3))


def link_ping(lab: Lab, uid: int) -> bool:
    """Both ends of link `uid` reach each other."""
    _, pod, _, ip, peer, _, peer_ip = next(lnk for lnk in LINKS if lnk[0] == uid)
    return ping(lab, pod, peer_ip.split("/")[0]) and ping(lab, peer, ip.split("/")[0])


def topology(lab: Lab, pod: str) -> Topology:
    store = open_store(lab.state.store_url)
    try:
        t = store.get(NS, pod)
    finally:
        store.close()
    assert t is not None
    return t


def add(lab: Lab, pod: str) -> tuple[int, dict[str, Any]]:
    """A kubelet's ADD of a new sandbox for `pod`; returns the plugin's exit code and output."""
    rec = lab.state.pods[pod]
    if not (NETNS_DIR / rec.netns).exists():
        lab.executor.run_sequence([Command(None, ("netns", "add", rec.netns)),
                                   Command(rec.netns, ("link", "set", "lo", "up"))])
    rec.container_id = secrets.token_hex(32)
    rc, answer = lab.cni("ADD", rec)
    rec.state = "up" if rc == 0 else "failed"
    lab.save()
    return rc, answer


def sandbox_ifnames(answer: dict[str, Any]) -> list[str]:
    return [i["name"] for i in answer.get("interfaces", []) if i.get("sandbox")]


# --- scenarios ------------------------------------------------------------------------------------

def test_every_pod_is_up_and_every_link_answers_ping(lab: Lab) -> None:
    assert {r.name: r.error for r in lab.state.pods.values() if r.state != "up"} == {}
    assert failed_pings(lab) == []


@pytest.mark.parametrize(("uid", "kind"), [(1, "veth"), (2, "vxlan"), (3, "macvlan")])
def test_link_kinds(lab: Lab, uid: int, kind: str) -> None:
    state = {lnk["uid"]: lnk for lnk in lab.status()["links"]}
    assert (state[uid]["kind"], state[uid]["state"]) == (kind, "up")
    if kind == "macvlan":
        assert ping(lab, "m", "10.1.3.5") is True  # from its own pod: configured
        argv = ["ip", "netns", "exec", lab.external_netns, "ping", "-c1", "-W1", "10.1.3.5"]
        assert subprocess.run(argv, capture_output=True, check=False, timeout=10).returncode == 0
    else:
        assert link_ping(lab, uid)


def test_vxlan_ends_point_at_each_others_vtep(lab: Lab) -> None:
    a, c = lab.kernel_links(pod_ns(lab, "a"))["eth2"], lab.kernel_links(pod_ns(lab, "c"))["eth3"]
    vni = naming.vni(NS, 2)
    assert a["linkinfo"]["info_data"]["id"] == c["linkinfo"]["info_data"]["id"] == vni
    assert a["linkinfo"]["info_data"]["remote"] == lab.node_info(1).vtep_ip
    assert c["linkinfo"]["info_data"]["remote"] == lab.node_info(0).vtep_ip


def test_pod_without_topology_has_only_lo_and_eth0(lab: Lab) -> None:
    assert sorted(ifnames(lab, "e")) == ["eth0", "lo"]
    rc, answer = lab.cni("CHECK", lab.state.pods["e"])
    assert (rc, answer) == (0, {})


def test_every_pods_eth0_result_names_the_bridge_address_its_node_keeps(lab: Lab) -> None:
    """The bridge plugin's CHECK compares the bridge address in a pod's result with the bridge's. When
    the plugin makes the bridge, concurrent first ADDs on a node race: each reads the address, adds its
    port (the kernel moves an unset bridge's address to its lowest port's), then sets the address it
    read; a pod could keep an address a later ADD overwrote, and its CHECK failed for good (CI, wave
    9). The lab makes each node's bridge first, with an address set by hand, which no port moves."""
    bridges = {}
    for i, node in enumerate(lab.state.nodes):
        entry = lab.kernel_links(lab.node_netns(i))["mnl0"]
        bridges[node] = entry["address"]
        assert entry["address"] == f"02:6d:6e:00:00:{i:02x}", node
    for rec in lab.state.pods.values():
        if rec.state == "up" and rec.result:
            mac = next(i["mac"] for i in rec.result["interfaces"] if i["name"] == "mnl0")
            assert mac == bridges[rec.node], rec.name


def test_pod_without_topology_gets_exactly_the_eth0_result(lab: Lab) -> None:
    lab.del_pod("e")
    rc, answer = add(lab, "e")
    assert rc == 0, answer
    assert sandbox_ifnames(answer) == ["eth0"]
    assert [ip["interface"] for ip in answer["ips"]] == [i for i, itf in enumerate(answer["interfaces"])
                                                         if itf["name"] == "eth0"]
    assert sorted(ifnames(lab, "e")) == ["eth0", "lo"]


def test_topology_without_pod_leaves_its_peer_link_pending(lab: Lab) -> None:
    assert "ghost" not in lab.state.pods
    assert "eth4" not in ifnames(lab, "a")
    ghost, a = topology(lab, "ghost"), topology(lab, "a")
    assert not ghost.status.alive
    assert {s.uid: s.state for s in a.status.links} == {1: "up", 2: "up", 4: "pending"}
    assert [(s.pod_name, s.link_id) for s in a.status.skipped] == [("ghost", 4)]


@pytest.mark.parametrize("first,second,uid", [("p1", "q1", 5), ("p2", "q2", 6)], ids=["vxlan", "veth"])
def test_second_add_builds_the_link_the_first_could_not(lab: Lab, first: str, second: str, uid: int) -> None:
    lab.del_pod(first)
    lab.del_pod(second)
    rc, answer = add(lab, first)
    assert rc == 0, answer
    assert sandbox_ifnames(answer) == ["eth0"]  # its peer is not there: no eth1 yet
    assert "eth1" not in ifnames(lab, first)
    rc, answer = add(lab, second)
    assert rc == 0, answer
    assert sandbox_ifnames(answer) == ["eth0", "eth1"]
    assert "eth1" in ifnames(lab, first)
    assert link_ping(lab, uid)
    assert {s.uid: s.state for s in topology(lab, first).status.links} == {uid: "up"}


def test_del_removes_and_re_add_restores(lab: Lab) -> None:
    lab.del_pod("r", remove_netns=False)
    assert "eth1" not in ifnames(lab, "r")
    assert "eth1" not in ifnames(lab, "s")  # the far end of the vxlan went with it
    assert not topology(lab, "r").status.alive
    lab.executor.run_best_effort([Command(None, ("netns", "del", pod_ns(lab, "r")))])
    rec = lab.add_pod("r")
    assert rec.state == "up", rec.error
    assert link_ping(lab, 7)
    rec = lab.restart_pod("s")
    assert rec.state == "up", rec.error
    assert link_ping(lab, 7)


def test_stale_del_after_a_newer_add_changes_nothing(lab: Lab) -> None:
    old = replace(lab.state.pods["u"])
    rec = lab.restart_pod("u")
    assert rec.state == "up", rec.error
    before = (ifnames(lab, "u"), ifnames(lab, "v"), topology(lab, "u").status)
    # The old sandbox's netns is gone (the runtime removed it): a path that does not exist any more.
    rc, answer = lab.cni("DEL", replace(old, netns=old.netns + "-gone"))
    assert rc == 0, answer
    assert (ifnames(lab, "u"), ifnames(lab, "v"), topology(lab, "u").status) == before
    assert topology(lab, "u").status.container_id == rec.container_id
    assert link_ping(lab, 8)


def test_check_passes_then_names_a_deleted_link(lab: Lab) -> None:
    rc, answer = lab.cni("CHECK", lab.state.pods["w"])
    assert (rc, answer) == (0, {})
    subprocess.run(["ip", "-n", pod_ns(lab, "w"), "link", "del", "eth1"], check=True, timeout=10)
    rc, answer = lab.cni("CHECK", lab.state.pods["w"])
    assert rc == 1
    assert answer["code"] == 101 and "eth1" in answer["details"] and "missing" in answer["details"], answer
    rec = lab.restart_pod("w")  # a kubelet's answer to a failed CHECK
    assert rec.state == "up", rec.error
    assert link_ping(lab, 9)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_add_result_per_version(lab: Lab, monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    config = lab.kubelet.cni_config
    monkeypatch.setattr(lab.kubelet, "cni_config", lambda node: {**config(node), "cniVersion": version})
    lab.del_pod("y")
    rc, answer = add(lab, "y")
    assert rc == 0, answer
    assert answer["cniVersion"] == version
    path = str(NETNS_DIR / pod_ns(lab, "y"))
    assert [(i["name"], i["sandbox"]) for i in answer["interfaces"] if i.get("sandbox")] == [
        ("eth0", path), ("eth1", path)]
    by_addr = {ip["address"]: ip for ip in answer["ips"]}
    assert answer["interfaces"][by_addr["10.1.10.1/24"]["interface"]]["name"] == "eth1"
    assert all(answer["interfaces"][ip["interface"]]["name"] in ("eth0", "eth1") for ip in answer["ips"])
    assert all(("version" in ip) == (version == "0.4.0") for ip in answer["ips"]), answer["ips"]
    assert link_ping(lab, 10)


FORGE = """
import json, sys
from meshnet.daemon.peer_client import PeerError, PeerLink
from meshnet.daemon.peers import GrpcPeerClient
client = GrpcPeerClient(timeout=10)
try:
    method = getattr(client, sys.argv[3])
    print(json.dumps({"action": method(sys.argv[1], PeerLink(**json.loads(sys.argv[2])))}))
except PeerError as e:
    print(json.dumps({"error": str(e)}))
"""


def peer_update_from(lab: Lab, node: int, to_node: int, link: dict[str, Any],
                     method: str = "update") -> dict[str, str]:
    """A peer Update (or Remove) sent from inside node `node`'s namespace to node `to_node`'s daemon."""
    argv = ["ip", "netns", "exec", lab.node_netns(node), sys.executable, "-c", FORGE,
            f"{lab.node_info(to_node).vtep_ip}:{DEFAULT_GRPC_PORT}", json.dumps(link), method]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True, timeout=60)
    return dict(json.loads(proc.stdout))


def honest_update(lab: Lab) -> dict[str, Any]:
    """What node0's daemon sends node1's for link 2 (a on node0, c on node1)."""
    return {"namespace": NS, "pod": "c", "peer_pod": "a", "uid": 2, "vni": naming.vni(NS, 2),
            "local_intf": "eth3", "peer_intf": "eth2", "local_ip": "10.1.2.2/24", "peer_ip": "10.1.2.1/24",
            "peer_vtep": lab.node_info(0).vtep_ip}


@pytest.mark.parametrize("forgery", [
    {"uid": 99, "vni": naming.vni(NS, 99), "local_intf": "evil0"},  # a link the store does not have
    {"peer_pod": "b"},  # a real uid, but not between those pods
    {"vni": naming.vni(NS, 2) + 1},
    {"local_intf": "evil0"},
    {"peer_vtep": "198.51.100.77"},  # a's pod is not behind that VTEP
], ids=["unknown-link", "wrong-pods", "wrong-vni", "wrong-interface", "wrong-vtep"])
def test_forged_peer_update_is_refused_and_creates_nothing(lab: Lab, forgery: dict[str, Any]) -> None:
    before = lab.kernel_links(pod_ns(lab, "c"))
    answer = peer_update_from(lab, 0, 1, {**honest_update(lab), **forgery})
    assert "PERMISSION_DENIED" in answer.get("error", ""), answer
    after = lab.kernel_links(pod_ns(lab, "c"))
    assert {n: e["ifindex"] for n, e in after.items()} == {n: e["ifindex"] for n, e in before.items()}
    assert after["eth3"]["linkinfo"] == before["eth3"]["linkinfo"]
    # The honest request passes the same way: the refusal was about the forgery, not the path.
    assert peer_update_from(lab, 0, 1, honest_update(lab)) == {"action": "unchanged"}
    assert link_ping(lab, 2)


def test_peer_requests_from_the_wrong_node_are_refused(lab: Lab) -> None:
    """a is node0's pod: node1 itself (its own address) may not ask node1 for a's link, nor may node0
    remove the live link; the end stays and the link works (no flap)."""
    before = lab.kernel_links(pod_ns(lab, "c"))
    wrong_caller = peer_update_from(lab, 1, 1, honest_update(lab))
    assert "PERMISSION_DENIED" in wrong_caller.get("error", "") and "is not VTEP" in wrong_caller["error"], wrong_caller
    live = peer_update_from(lab, 0, 1, honest_update(lab), "remove")
    assert "PERMISSION_DENIED" in live.get("error", "") and "its link is live" in live["error"], live
    after = lab.kernel_links(pod_ns(lab, "c"))
    assert [after["eth3"][k] for k in ("ifindex", "linkinfo")] == [before["eth3"][k] for k in ("ifindex", "linkinfo")]
    assert link_ping(lab, 2)


def listening(netns: str, port: int) -> set[str]:
    """Addresses a TCP socket listens on `port` in `netns` (`ss` run inside it)."""
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{port}"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines() if line.strip()}


def test_the_peer_port_listens_on_the_vtep_only(lab: Lab) -> None:
    """No TLS in the lab: each daemon's gRPC port is on its VTEP address, never every address."""
    for i in range(2):
        got = listening(lab.node_netns(i), DEFAULT_GRPC_PORT)
        assert got and got <= {lab.node_info(i).vtep_ip, f"::ffff:{lab.node_info(i).vtep_ip}"}, got


# --- 20 concurrent ADDs on one node -----------------------------------------------------------------

def ring(n: int) -> str:
    """`n` pods k0..k<n-1> on node0, k<i> eth1 — k<i+1> eth2."""
    docs: list[dict[str, Any]] = []
    for i in range(n):
        prev, nxt = (i - 1) % n, (i + 1) % n
        links = [{"uid": 100 + i, "peer_pod": f"k{nxt}", "local_intf": "eth1", "peer_intf": "eth2",
                  "local_ip": f"10.2.{i}.1/24", "peer_ip": f"10.2.{i}.2/24"},
                 {"uid": 100 + prev, "peer_pod": f"k{prev}", "local_intf": "eth2", "peer_intf": "eth1",
                  "local_ip": f"10.2.{prev}.2/24", "peer_ip": f"10.2.{prev}.1/24"}]
        docs.append({"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": {"name": f"k{i}"},
                     "spec": {"links": links}})
        docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"k{i}"},
                     "spec": {"nodeName": "node0", "containers": [{"name": "c", "image": "alpine:3"}]}})
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


def veth_creations(journal: Path) -> Counter[frozenset[tuple[str, str]]]:
    """How often each veth pair was created by a batch that succeeded."""
    made: Counter[frozenset[tuple[str, str]]] = Counter()
    for line in journal.read_text().splitlines():
        entry = json.loads(line)
        if entry["rc"] != 0:
            continue  # a failed batch rolled back what it had created
        for cmd in entry["commands"]:
            words = cmd.split()
            if words[:2] == ["link", "add"] and "veth" in words:
                a = (words[words.index("netns") + 1], words[2])
                b = (words[-1], words[words.index("name") + 1])
                made[frozenset((a, b))] += 1
    return made


def test_twenty_concurrent_adds_on_one_node(tmp_path: Path) -> None:
    n = 20
    with lab_up(tmp_path, ring(n), nodes=1, workers=n) as lab:
        assert {r.name: r.error for r in lab.state.pods.values() if r.state != "up"} == {}
        made = veth_creations(lab.dir / "node0.journal")
        assert len(made) == n and set(made.values()) == {1}, made
        for i in range(n):
            assert sorted(ifnames(lab, f"k{i}")) == ["eth0", "eth1", "eth2", "lo"]
        checks = lab.connectivity()
        assert len(checks) == 2 * n
        assert [c for c in checks if not c["ok"]] == []
