"""`lab status` reads each pod's links over rtnetlink in-process (meshnet.rtnl): what it reads
must be what `ip -j -d link show` says (name, kind, flags) for the kinds the lab makes."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnet import rtnl

pytestmark = pytest.mark.root

TESTS = Path(__file__).parent


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mnt-rtnl-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


def test_links_are_what_ip_shows(netns: str) -> None:
    _ip(netns, "link", "set", "lo", "up")
    _ip(netns, "link", "add", "mnt-a", "type", "veth", "peer", "name", "mnt-b")
    _ip(netns, "link", "add", "mnt-up", "type", "veth", "peer", "name", "mnt-up2")
    _ip(netns, "link", "set", "mnt-up", "up")
    _ip(netns, "link", "set", "mnt-up2", "up")
    _ip(netns, "link", "add", "mnt-vx", "type", "vxlan", "id", "4242", "local", "198.51.100.9", "dstport", "4789")
    _ip(netns, "link", "set", "mnt-vx", "up")
    _ip(netns, "link", "add", "mnt-half", "type", "veth", "peer", "name", "mnt-half2")
    _ip(netns, "link", "set", "mnt-half", "up")  # its peer down: no carrier
    shown = json.loads(subprocess.run(["ip", "-n", netns, "-j", "-d", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    # M-DOWN is `ip`'s own: derived from the peer's state, not a flag of the interface.
    expected = {e["ifname"]: (e.get("linkinfo", {}).get("info_kind", ""), [f for f in e["flags"] if f != "M-DOWN"])
                for e in shown}
    got = {name: (e.get("linkinfo", {}).get("info_kind", ""), e["flags"]) for name, e in rtnl.links(netns).items()}
    assert got == expected
    assert got["mnt-up"] == ("veth", ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"])
    assert "UP" not in got["mnt-a"][1]
    assert "LOWER_UP" not in got["mnt-half"][1] and "NO-CARRIER" in got["mnt-half"][1]


def test_a_namespace_that_is_gone_is_an_oserror() -> None:
    with pytest.raises(OSError):
        rtnl.links(f"mnt-rtnl-gone-{secrets.token_hex(3)}")
    with pytest.raises(OSError):
        rtnl.links("../../etc/passwd")


@pytest.mark.slow
def test_lab_status_reads_the_same_as_through_ip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lab status` over rtnetlink says what it said when it ran `ip -j -d addr show` per pod:
    with every link up, and with one end taken down."""
    from meshnet.lab.reports import Reports
    from tests.labkit import lab_up

    with lab_up(tmp_path, TESTS / "3node.yml", nodes=2) as lab:
        def both() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
            fast = [(lk["uid"], lk["kind"], lk["state"]) for lk in lab.status()["links"]]
            with monkeypatch.context() as m:
                m.setattr(Reports, "link_states", lambda self, netns: lab.kernel_links(netns))
                slow = [(lk["uid"], lk["kind"], lk["state"]) for lk in lab.status()["links"]]
            return fast, slow

        fast, slow = both()
        assert fast == slow and {s for _, _, s in fast} == {"up"}
        for node in lab.state.nodes:  # nobody sets it up again between the two readings
            lab.stop_daemon(node)
        subprocess.run(["ip", "-n", lab.pod_netns("r1"), "link", "set", "eth1", "down"], check=True)
        fast, slow = both()
        assert fast == slow and "down" in {s for _, _, s in fast}
