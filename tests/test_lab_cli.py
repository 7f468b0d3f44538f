"""`meshnetctl lab ...` as a user runs it: separate processes, exit codes, what is printed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import list_netns

pytestmark = pytest.mark.root

TESTS = Path(__file__).parent
MESHNETCTL = str(Path(sys.executable).parent / "meshnetctl")


class Cli:
    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name
        self.env = {**os.environ, "MESHNET_LAB_ROOT": str(root)}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        words = 2 if args[0] in ("pod", "daemon") else 1  # `--name` goes after the (sub)command
        argv = [MESHNETCTL, "lab", *args[:words], "--name", self.name, *args[words:]]
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=300, check=False)

    def down(self) -> None:
        proc = self("down")
        assert proc.returncode == 0, proc.stderr
        assert [n for n in list_netns() if n.startswith(f"mnl-{self.name}-")] == []
        assert not (self.root / self.name).exists()


@pytest.fixture
def cli() -> Iterator[Cli]:
    # A short root: unix socket paths (<root>/<lab>/<node>.sock) are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="mnl", dir="/tmp"))
    c = Cli(root, f"c{secrets.token_hex(3)}")
    try:
        yield c
    finally:
        c.down()
        shutil.rmtree(root, ignore_errors=True)


def test_up_status_exec_ping_restart(cli: Cli) -> None:
    up = cli("up", str(TESTS / "3node.yml"), "--nodes", "3", "--ping")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "links up: vxlan: 3 (of 3 in the topology)" in up.stdout
    assert "6/6 link ends answer" in up.stdout

    status = cli("status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert set(doc) >= {"lab", "manifest", "store", "nodes", "pods", "links"}
    assert doc["lab"] == cli.name and doc["store"].startswith("sqlite://")
    assert [n["name"] for n in doc["nodes"]] == ["node0", "node1", "node2"]
    for n in doc["nodes"]:
        assert n["daemon"] == "running" and n["daemon_pid"] > 0 and n["netns"] == f"mnl-{cli.name}-{n['name']}"
    assert {(p["name"], p["node"], p["state"]) for p in doc["pods"]} == {
        ("r1", "node0", "up"), ("r2", "node1", "up"), ("r3", "node2", "up")}
    assert sorted((lk["uid"], lk["a"], lk["b"], lk["kind"], lk["state"]) for lk in doc["links"]) == [
        (1, "r1:eth1", "r2:eth1", "vxlan", "up"),
        (2, "r1:eth2", "r3:eth1", "vxlan", "up"),
        (3, "r2:eth2", "r3:eth2", "vxlan", "up"),
    ]

    table = cli("status")
    assert table.returncode == 0 and "r2:eth2" in table.stdout and "vxlan" in table.stdout

    ex = cli("exec", "r1", "--", "ip", "-br", "addr", "show", "dev", "eth2")
    assert ex.returncode == 0, ex.stderr
    assert "13.13.13.1/24" in ex.stdout
    assert cli("exec", "r1", "--", "false").returncode != 0
    missing = cli("exec", "nosuchpod", "--", "true")
    assert missing.returncode == 1 and "no pod 'nosuchpod'" in missing.stderr

    restart = cli("pod", "restart", "r3")
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert "r3: up" in restart.stdout
    daemon = cli("daemon", "restart", "node0")
    assert daemon.returncode == 0, daemon.stderr
    ping = cli("ping")
    assert ping.returncode == 0, ping.stdout
    assert "6/6 link ends answer" in ping.stdout


def test_failing_add_is_reported(cli: Cli, tmp_path: Path) -> None:
    """A macvlan on a parent the node does not allow (the lab allows only eth0): `lab up` fails
    loudly, naming the CNI error, the interface and the setting."""
    manifest = tmp_path / "bad-parent.yml"
    manifest.write_text((TESTS / "macvlan.yml").read_text().replace("peer_intf: eth0", "peer_intf: nosuchif0"))
    up = cli("up", str(manifest), "--nodes", "1")
    assert up.returncode != 0
    assert "FAILED r2: CNI error 100" in up.stdout
    assert "host interface nosuchif0 is not an allowed macvlan parent" in up.stdout
    assert "--macvlan-parents (env MACVLAN_PARENTS) allows: eth0" in up.stdout
    doc = json.loads(cli("status", "--json").stdout)
    pods = {p["name"]: p for p in doc["pods"]}
    assert pods["r2"]["state"] == "failed" and "nosuchif0" in pods["r2"]["error"]
    assert pods["r1"]["state"] == "up"
    # r2's failed ADD rolled back what it made: no eth0 (delegate undone), no eth2.
    names = cli("exec", "r2", "--", "ip", "-br", "link").stdout
    assert "eth0" not in names and "eth2" not in names


def test_status_of_a_missing_lab_fails(cli: Cli) -> None:
    status = cli("status")
    assert status.returncode == 1
    assert f"no lab named '{cli.name}'" in status.stderr


def test_up_twice_is_refused(cli: Cli) -> None:
    assert cli("up", str(TESTS / "2node.yml")).returncode == 0
    again = cli("up", str(TESTS / "2node.yml"))
    assert again.returncode == 1 and "already up" in again.stderr


def test_one_pod_name_in_two_namespaces_is_refused_before_anything_is_made(cli: Cli, tmp_path: Path) -> None:
    manifest = tmp_path / "two-labs.yml"
    manifest.write_text("\n---\n".join(
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: r1, namespace: {ns}}}" for ns in ("lab-a", "lab-b")))
    up = cli("up", str(manifest), "--nodes", "1")
    assert up.returncode == 1
    assert "Pod lab-b/r1: metadata.name" in up.stderr and "lab-a/r1" in up.stderr
    assert [n for n in list_netns() if n.startswith(f"mnl-{cli.name}-")] == []
    assert not (cli.root / cli.name).exists()


def test_lab_down_resets_kube_statuses_at_a_teardown_rate_and_keeps_the_rest_of_the_url() -> None:
    """One client resetting hundreds of statuses once: not paced like a node's daemon (50/s)."""
    from urllib.parse import parse_qs, urlsplit

    from meshnet.lab.cluster import TEARDOWN_BURST, TEARDOWN_QPS, teardown_store_url
    from meshnet.store import open_store

    def options(url: str) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}

    assert options(teardown_store_url("kube")) == {"qps": f"{TEARDOWN_QPS:g}", "burst": str(TEARDOWN_BURST)}
    raised = teardown_store_url("kube:?kubeconfig=/tmp/k%20c.yaml&qps=5&burst=10")
    assert options(raised) == {"kubeconfig": "/tmp/k c.yaml", "qps": f"{TEARDOWN_QPS:g}", "burst": str(TEARDOWN_BURST)}
    assert options(teardown_store_url("kube:?qps=1000&burst=2000")) == {"qps": "1000", "burst": "2000"}
    assert teardown_store_url("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"
    assert teardown_store_url("kube:?qps=lots") == "kube:?qps=lots"  # open_store names the bad value
    with pytest.raises(ValueError, match="qps must be a number"):
        open_store(teardown_store_url("kube:?qps=lots"))
    from tests.kubeapi.server import KubeApiServer

    with KubeApiServer() as server:
        store = open_store(teardown_store_url(f"kube:?kubeconfig={server.kubeconfig}&qps=5"))
        try:
            assert (store.limiter.qps, store.limiter.burst) == (TEARDOWN_QPS, TEARDOWN_BURST)  # type: ignore[attr-defined]
        finally:
            store.close()
