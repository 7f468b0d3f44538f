"""Root: a lab node whose meshnetd is killed (issue 13). DEL still completes and frees the pod's
host-local lease (the shim runs the real bridge + host-local DEL itself); a pod with a Topology
gets error 11; a pod without one starts with eth0, and once a Topology for it appears and the
daemon is back, its links come up."""

from __future__ import annotations

import signal
import subprocess
import time
from ipaddress import ip_interface as parse_ip
from pathlib import Path

from meshnet.cni import offline
from meshnet.lab.cluster import Lab
from meshnet.model import Link, Topology
from meshnet.store import open_store
from tests.labkit import lab_up

MANIFEST = """
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: r1}
spec:
  links:
  - {uid: 1, peer_pod: r2, local_intf: eth1, peer_intf: eth1, local_ip: 12.12.12.1/24, peer_ip: 12.12.12.2/24}
---
apiVersion: networkop.co.uk/v1beta1
kind: Topology
metadata: {name: r2}
spec:
  links:
  - {uid: 1, peer_pod: r1, local_intf: eth1, peer_intf: eth1, local_ip: 12.12.12.2/24, peer_ip: 12.12.12.1/24}
""" + "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec: {{containers: [{{name: c, image: alpine:3}}]}}
""" for name in ("r1", "r2", "r3"))


def _leases(lab: Lab, container_id: str) -> list[str]:
    """host-local's lease files for a sandbox (each holds its container id)."""
    assert container_id
    root = lab.dir / "ipam" / "node0"
    return sorted(p.name for p in root.rglob("*") if p.is_file() and container_id in p.read_text(errors="replace"))


def _configured(lab: Lab, pod: str, intf: str, address: str) -> bool:
    entry = lab.kernel_links(lab.pod_netns(pod)).get(intf)
    return entry is not None and "UP" in entry.get("flags", ()) and address in {
        f"{a.get('local')}/{a.get('prefixlen')}" for a in entry.get("addr_info", ())}


def _wait(cond: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_daemon_down_del_completes_and_pods_without_topology_start(tmp_path: Path) -> None:
    with lab_up(tmp_path, MANIFEST, nodes=1) as lab:
        pods = lab.state.pods
        assert {p.name: p.state for p in pods.values()} == {"r1": "up", "r2": "up", "r3": "up"}
        assert lab.topology_index("node0").exists()
        assert offline.read_index(str(lab.topology_index("node0"))) == {("default", "r1"), ("default", "r2")}
        lab.stop_daemon("node0", signal.SIGKILL)

        # DEL with the daemon down: the shim runs the delegate's DEL; the lease is freed.
        old = pods["r2"].container_id
        assert _leases(lab, old)
        lab.del_pod("r2")
        assert _leases(lab, old) == []
        # ADD of a pod with a Topology: error 11, as before (asked once: the kubelet's retries aside).
        rec = lab.add_pod("r2", retry_for=0)
        assert rec.state == "failed" and "CNI error 11" in rec.error and "has a Topology" in rec.error
        failed = rec.container_id
        lab.del_pod("r2")  # the runtime cleans the failed sandbox up: also without the daemon
        assert failed and _leases(lab, failed) == []

        # A pod without a Topology restarts with eth0 at once.
        lab.del_pod("r3")
        rec = lab.add_pod("r3")
        assert rec.state == "up", rec.error
        assert set(lab.kernel_links(rec.netns)) == {"lo", "eth0"}
        assert _leases(lab, rec.container_id)

        # A Topology for it appears while the daemon is down (r1 gets the other end) ...
        store = open_store(lab.state.store_url)
        try:
            store.apply(Topology("r3", "default", (Link(2, "r1", "eth1", "eth2", parse_ip("13.13.13.3/24"),
                                                       parse_ip("13.13.13.1/24")),)))
            r1 = store.get("default", "r1")
            assert r1 is not None
            store.apply(Topology("r1", "default", (*r1.links, Link(2, "r3", "eth2", "eth1",
                                                                  parse_ip("13.13.13.1/24"),
                                                                  parse_ip("13.13.13.3/24")))))
        finally:
            store.close()
        # ... and once the daemon is back, the link is built for the running sandbox.
        lab.start_daemon("node0")
        lab.wait_daemon("node0")
        # Addressed and up, not only made: the veth pair comes first, each end's address and `up`
        # in a batch of its own namespace after it (a ping in between: "Network is unreachable").
        assert _wait(lambda: _configured(lab, "r3", "eth1", "13.13.13.3/24")
                     and _configured(lab, "r1", "eth2", "13.13.13.1/24")), lab.kernel_links(lab.pod_netns("r3"))
        ping = subprocess.run(["ip", "netns", "exec", lab.pod_netns("r3"), "ping", "-c1", "-W2", "13.13.13.1"],
                              capture_output=True, check=False)
        assert ping.returncode == 0, ping.stdout
        assert offline.read_records(str(lab.topology_index("node0"))) == ([], [])
        assert '"event": "adopted"' in (lab.dir / "node0.log").read_text()  # built for the shim's sandbox
        # And r2, the pod with a Topology, comes up now that the daemon is back.
        assert lab.add_pod("r2").state == "up"
