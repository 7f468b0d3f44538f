"""Replay `scripts/dry-run` for every test manifest on real namespaces, ping every link, tear down.

Expectations come from the manifest: each link whose two pods exist and describe it must have both
ends up, and each addressed end must answer a ping from the other end (macvlan ends: from the
external namespace). Every namespace carries a per-test prefix `mnt-<random>-`; whatever happens,
the teardown script runs and a final sweep removes anything left with that prefix.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

from meshnet.dryrun import EXTERNAL_HOST, UNDERLAY
from meshnet.model import Manifest, load_manifest
from tests.netns import delete_prefix, ip, leftovers, unique_prefix
from tests.test_plan import _expected_ends

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "tests").glob("*.yml"))

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class Probe:
    """Ping `target` from namespace `source` (over the link `uid`)."""

    uid: int
    source: str
    target: str


def dry_run(manifest: Path, nodes: int, prefix: str, *, delete: bool = False) -> str:
    args = [str(ROOT / "scripts" / "dry-run"), str(manifest), "--nodes", str(nodes), "--prefix", prefix]
    r = subprocess.run([*args, *(["--delete"] if delete else [])], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def run_script(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-s"], input=text, capture_output=True, text=True, timeout=120, check=False)


def expected_ends(m: Manifest, prefix: str) -> set[tuple[str, str]]:
    """(netns, interface) of every link end that must exist after the replay."""
    return {(prefix + pod, intf) for pod, intf in _expected_ends(m)}


def probes(m: Manifest, prefix: str) -> list[Probe]:
    pods = {p.name for p in m.pods}
    out: list[Probe] = []
    for t in m.topologies:
        if t.name not in pods:
            continue
        for lnk in t.links:
            if lnk.is_macvlan:
                if lnk.local_ip is not None:
                    out.append(Probe(lnk.uid, prefix + "ext", str(lnk.local_ip.ip)))
            elif lnk.peer_pod in pods and m.topology(t.namespace, lnk.peer_pod) and lnk.peer_ip is not None:
                # every addressed end is pinged from its peer: both directions of every link
                out.append(Probe(lnk.uid, prefix + t.name, str(lnk.peer_ip.ip)))
    return out


def ping(p: Probe, tries: int = 3) -> str | None:
    """None when `p.target` answers; else what ping said. Retries cover the first ARP exchange."""
    last = ""
    for _ in range(tries):
        r = subprocess.run(["ip", "netns", "exec", p.source, "ping", "-n", "-c1", "-W1", p.target],
                           capture_output=True, text=True, timeout=10, check=False)
        if r.returncode == 0:
            return None
        said = (r.stdout + r.stderr).strip().splitlines()
        last = said[-1] if said else f"ping exited {r.returncode}"
        time.sleep(0.2)
    return f"uid {p.uid}: {p.source} -> {p.target}: {last}"


def links_up(netns: str) -> dict[str, bool]:
    out = json.loads(ip("-n", netns, "-j", "link", "show").stdout or "[]")
    return {e["ifname"]: "UP" in e.get("flags", []) for e in out}


def created_names(script: str) -> set[str]:
    """Every interface name a script creates (`link add NAME`, `peer name NAME`)."""
    names: set[str] = set()
    for line in script.splitlines():
        words = line.split()
        for i in range(len(words) - 2):
            if (words[i], words[i + 1]) in (("link", "add"), ("peer", "name")):
                names.add(words[i + 2])
    return names


def host_links() -> set[str]:
    return {e["ifname"] for e in json.loads(ip("-j", "link", "show").stdout or "[]")}


@pytest.fixture
def lab_prefix() -> Iterator[str]:
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        stuck = delete_prefix(prefix)
        assert not stuck, f"could not delete {stuck}"


@pytest.mark.parametrize("nodes", [1, 3])
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_replay_pings_and_tears_down(manifest: Path, nodes: int, lab_prefix: str) -> None:
    m = load_manifest(manifest)
    before = host_links()
    setup = dry_run(manifest, nodes, lab_prefix)
    teardown = dry_run(manifest, nodes, lab_prefix, delete=True)
    try:
        r = run_script(setup)
        assert r.returncode == 0, f"replay failed:\n{r.stderr}"
        ends = expected_ends(m, lab_prefix)
        assert ends, "the manifest has no link to test"
        pods = sorted({ns for ns, _ in ends})
        state = {ns: links_up(ns) for ns in pods}
        for ns, intf in sorted(ends):
            assert state[ns].get(intf) is True, f"{ns} {intf} missing or down: {state[ns]}"
        for ns in pods:  # no stray interfaces in the pods: lo plus exactly the manifest's ends
            assert set(state[ns]) == {"lo"} | {i for n, i in ends if n == ns}
        todo = probes(m, lab_prefix)
        assert todo, "the manifest has no addressed link"
        with ThreadPoolExecutor(max_workers=8) as pool:
            failures = [f for f in pool.map(ping, todo) if f]
        assert not failures, "\n".join(failures)
    finally:
        run_script(teardown)
    assert leftovers(lab_prefix) == []
    # Nothing the script creates appeared in the host namespace. (Only our names are compared:
    # other tests running at the same time may legitimately add interfaces there.)
    ours = created_names(setup)
    assert {"br0", "eth0"} <= ours
    assert (host_links() - before) & ours == set()


def test_ping_can_fail(lab_prefix: str) -> None:
    """The ping helper reports an address nobody has (guards the replay test against always passing)."""
    ns = f"{lab_prefix}solo"
    ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ip("-n", ns, "addr", "add", f"{UNDERLAY[EXTERNAL_HOST]}/24", "dev", "v0")
    ip("-n", ns, "link", "set", "v0", "up")
    ip("-n", ns, "link", "set", "v1", "up")
    assert ping(Probe(0, ns, str(UNDERLAY[EXTERNAL_HOST]))) is None
    failure = ping(Probe(0, ns, str(UNDERLAY[EXTERNAL_HOST - 1])), tries=1)
    assert failure is not None and "uid 0" in failure


def test_cleanup_dry_run_lists_test_namespaces_and_deletes_nothing(lab_prefix: str) -> None:
    # Only --dry-run here: a real run would also delete the namespaces of tests running in parallel.
    ns = f"{lab_prefix}left"
    ip("netns", "add", ns)
    r = subprocess.run([str(ROOT / "scripts" / "cleanup"), "--dry-run"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert f"would delete {ns}\n" in r.stdout
    listed = [line.split()[-1] for line in r.stdout.splitlines() if line.startswith("would delete ")]
    assert all(n.startswith(("mnt-", "mnb-", "mnd-", "mnp-", "mnl-")) for n in listed), listed
    assert leftovers(lab_prefix) == [ns]


def test_cleanup_keeps_labs_whose_meshnetd_runs() -> None:
    spec = importlib.util.spec_from_loader("cleanup", SourceFileLoader("cleanup", str(ROOT / "scripts" / "cleanup")))
    assert spec is not None and spec.loader is not None
    cleanup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cleanup)
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "meshnetd", "--node",
                             "mnl-zz9-node0"])
    try:
        deadline = time.monotonic() + 5
        while "zz9" not in cleanup.live_labs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "zz9" in cleanup.live_labs()
    finally:
        fake.kill()
        fake.wait()
    assert "zz9" not in cleanup.live_labs()
