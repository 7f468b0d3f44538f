"""`meshnetctl topo build`: deterministic, connected, exactly M links, unique addresses, valid manifests."""

from __future__ import annotations

import ipaddress
from collections import deque
from pathlib import Path

import pytest
import yaml

from meshnet.cli import main
from meshnet.model import parse_manifest
from meshnet.topo.builder import LARGE_LOOPBACKS, LINK_SPACE, LOOPBACK_ANNOTATION, BuildError, build, render
from meshnet.topo.routes import loopbacks_from_text

TESTS = Path(__file__).resolve().parent


def _connected(adj: dict[str, set[str]]) -> bool:
    start = next(iter(adj))
    seen = {start}
    queue = deque([start])
    while queue:
        for peer in adj[queue.popleft()]:
            if peer not in seen:
                seen.add(peer)
                queue.append(peer)
    return seen == set(adj)


@pytest.mark.parametrize(("n", "m", "seed"), [(2, 1, 0), (20, 19, 1), (20, 24, 20), (12, 66, 3), (30, 200, 7),
                                              (256, 256, 9)])
def test_manifest_is_connected_with_m_links_and_unique_addresses(n: int, m: int, seed: int) -> None:
    text = render(build(n, m, seed=seed))
    manifest = parse_manifest(text, "built")  # also checks mirrored links and unique uids
    assert len(manifest.pods) == n and len(manifest.topologies) == n
    adj: dict[str, set[str]] = {t.name: set() for t in manifest.topologies}
    uids: set[int] = set()
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for t in manifest.topologies:
        assert [lnk.local_intf for lnk in t.links] == [f"eth{i}" for i in range(1, len(t.links) + 1)]
        for lnk in t.links:
            assert lnk.peer_pod != t.name
            assert lnk.peer_pod not in adj[t.name], f"duplicate edge {t.name}-{lnk.peer_pod}"
            adj[t.name].add(lnk.peer_pod)
            uids.add(lnk.uid)
            assert lnk.local_ip is not None and lnk.peer_ip is not None
            assert lnk.local_ip.network == lnk.peer_ip.network and lnk.local_ip.network.prefixlen == 30
            assert lnk.local_ip.network.subnet_of(LINK_SPACE)  # type: ignore[arg-type]
            addresses.append(lnk.local_ip)
    assert uids == set(range(1, m + 1))
    assert sum(len(v) for v in adj.values()) == 2 * m
    assert _connected(adj)
    assert len(set(addresses)) == len(addresses) == 2 * m
    loopbacks = loopbacks_from_text(text)
    assert set(loopbacks) == set(adj)
    assert len(set(loopbacks.values())) == n
    space = ipaddress.ip_network("192.0.2.0/24") if n <= 254 else LARGE_LOOPBACKS
    assert all(lo.network.prefixlen == 32 and lo.ip in space for lo in loopbacks.values())


def test_same_seed_same_bytes_other_seed_other_topology(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.yml", tmp_path / "b.yml", tmp_path / "c.yml"
    assert main(["topo", "build", "25", "--links", "30", "--seed", "4", "-o", str(a)]) == 0
    assert main(["topo", "build", "25", "--links", "30", "--seed", "4", "-o", str(b)]) == 0
    assert main(["topo", "build", "25", "--links", "30", "--seed", "5", "-o", str(c)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_cli_prints_link_count_and_defaults_to_a_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.yml"
    assert main(["topo", "build", "20", "--prefix", "r", "--namespace", "lab1", "-o", str(out)]) == 0
    assert "Total number of links generated: 19" in capsys.readouterr().out
    docs = list(yaml.safe_load_all(out.read_text()))
    assert {d["metadata"]["namespace"] for d in docs} == {"lab1"}
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert [p["metadata"]["name"] for p in pods] == [f"r-{i}" for i in range(1, 21)]
    assert pods[0]["metadata"]["annotations"][LOOPBACK_ANNOTATION] == "192.0.2.1/32"


@pytest.mark.parametrize(("n", "m", "why"), [(20, 18, "outside 19..190"), (20, 191, "outside 19..190"),
                                             (1, None, "at least 2"), (5000, None, "uids")])
def test_refuses_impossible_link_counts(n: int, m: int | None, why: str) -> None:
    with pytest.raises(BuildError, match=why):
        build(n, m)


def test_cli_refusal_is_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.yml"
    assert main(["topo", "build", "4", "--links", "7", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--links: 7 is outside 3..6 for 4 routers" in err
    assert not out.exists()


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(BuildError, match="--prefix"):
        build(3, prefix="Bad_Prefix")


def test_20node_fixture_is_the_builders_output() -> None:
    # tests/20node.yml is generated: `meshnetctl topo build 20 --links 24 --seed 20 -o tests/20node.yml`.
    assert (TESTS / "20node.yml").read_text() == render(build(20, 24, seed=20), seed=20)
