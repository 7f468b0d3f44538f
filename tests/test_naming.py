"""Interface-name rules, VNIs per namespace, deterministic kernel-object names."""

from __future__ import annotations

from typing import Any

import pytest

from meshnet import naming


@pytest.mark.parametrize("good", ["eth1", "e", "a" * 15, "e1-1", "ge-0.0.0", "Ethernet1", "eth1_2", "1eth"])
def test_good_interface_names(good: str) -> None:
    assert naming.ifname_problem(good) is None


@pytest.mark.parametrize(("bad", "why"), [
    ("", "empty"),
    ("a" * 16, "at most 15"),
    (".", "not allowed"),
    ("..", "not allowed"),
    ("eth 1", "' '"),
    ("eth1\nlink", "'\\n'"),
    ("eth/1", "'/'"),
    ("eth:1", "':'"),
    ("eth'1", "quotes"),
    ('eth"1', "quotes"),
    ("eth#1", "'#'"),
    ("eth\\1", "'\\\\'"),
    ("e;reboot", "only letters"),
    ("$(reboot)", "only letters"),
    ("`id`", "only letters"),
    ("-force", "starting with a letter or digit"),
    ("eth\x01", "non-printable"),
    ("ethé", "only letters"),
    (7, "must be a string"),
    (None, "must be a string"),
])
def test_bad_interface_names(bad: object, why: str) -> None:
    problem = naming.ifname_problem(bad)
    assert problem is not None and why in problem


@pytest.mark.parametrize(("name", "label", "ok"), [
    ("r1", False, True), ("r1-0", False, True), ("a.b", False, True), ("R1", False, False),
    ("r1;x", False, False), ("r2 netns x", False, False), ("-r1", False, False), ("a" * 254, False, False),
    ("default", True, True), ("a.b", True, False), ("a" * 64, True, False), (None, False, False),
])
def test_kubernetes_names(name: object, label: bool, ok: bool) -> None:
    assert (naming.k8s_name_problem(name, label=label) is None) is ok


@pytest.mark.parametrize(("name", "ok"), [("mnt-abc", True), ("mnp-0123456789abcdef", True), ("-x", False),
                                          ("a b", False), ("a/b", False), ("a" * 64, False), (None, False)])
def test_netns_names(name: object, ok: bool) -> None:
    assert (naming.netns_problem(name) is None) is ok


def test_same_uid_in_two_namespaces_gets_different_vnis() -> None:
    assert naming.vni("default", 1) != naming.vni("lab-a", 1)
    assert naming.vni("lab-a", 1) != naming.vni("lab-b", 1)


def test_vni_is_stable() -> None:
    # crc32 of the namespace picks the block: the same on every daemon, after every restart.
    # Pinned, because a change of format would re-number every running lab's VXLANs.
    assert naming.vni("default", 1) == naming.vni("default", 1) == 2621441
    assert naming.vni_block("default") == 640


def test_vni_block_rule_and_24_bits() -> None:
    for ns in ("default", "lab", "kne-test", "x" * 63, *(f"ns{i}" for i in range(200))):
        block = naming.vni_block(ns)
        assert 1 <= block <= naming.VNI_BLOCKS
        for uid in (0, 1, naming.MAX_UID):
            v = naming.vni(ns, uid)
            assert v // naming.VNI_BLOCK_SIZE == block and v % naming.VNI_BLOCK_SIZE == uid
            assert naming.VNI_BLOCK_SIZE <= v < 2**24  # clear of VNIs 0-4095, within 24 bits
    assert naming.VNI_BLOCKS * naming.VNI_BLOCK_SIZE + naming.MAX_UID < 2**24


def test_uids_of_one_namespace_get_distinct_vnis() -> None:
    assert len({naming.vni("lab", uid) for uid in range(naming.MAX_UID + 1)}) == naming.MAX_UID + 1


@pytest.mark.parametrize("uid", [-1, naming.MAX_UID + 1])
def test_vni_uid_out_of_range(uid: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        naming.vni("default", uid)


def test_attached_netns_name_is_deterministic_and_safe() -> None:
    a = naming.attached_netns_name("/proc/1234/ns/net")
    assert a == naming.attached_netns_name("/proc/1234/ns/net")
    assert a != naming.attached_netns_name("/proc/1235/ns/net")
    assert a.startswith("mnp-") and len(a) == 20 and naming.netns_problem(a) is None


# --- VNI blocks recorded per namespace (no two namespaces share one) -------------------------------

def test_a_namespace_gets_its_home_block_when_free() -> None:
    assert naming.choose_vni_block("lab-27", [], []) == naming.vni_block("lab-27") == 219


def test_a_namespace_whose_home_block_is_taken_gets_the_next_free_one() -> None:
    # lab-27 and lab-59 hash to the same block: the second one to come up moves on.
    assert naming.vni_block("lab-59") == naming.vni_block("lab-27")
    assert naming.choose_vni_block("lab-59", [], [("lab-27", 219)]) == 220
    assert naming.choose_vni_block("lab-59", [], [("lab-27", 219), ("x", 220), ("y", 222)]) == 221


def test_probing_wraps_around_the_last_block() -> None:
    ns = next(f"n{i}" for i in range(100_000) if naming.vni_block(f"n{i}") == naming.VNI_BLOCKS)
    assert naming.choose_vni_block(ns, [], [("other", naming.VNI_BLOCKS)]) == 1


def test_pods_of_a_namespace_adopt_the_smallest_block_it_recorded() -> None:
    assert naming.choose_vni_block("lab-59", [230, 0, 220], [("lab-27", 219)]) == 220


def test_a_block_two_namespaces_recorded_stays_with_the_smaller_name() -> None:
    assert not naming.block_lost("lab-27", 219, [("lab-59", 219)])
    assert naming.block_lost("lab-59", 219, [("lab-27", 219)])
    assert naming.choose_vni_block("lab-27", [219], [("lab-59", 219)]) == 219
    # The loser gives it up even though its own pods recorded it, and skips every taken block.
    assert naming.choose_vni_block("lab-59", [219], [("lab-27", 219), ("z", 220)]) == 221


def test_every_block_taken_is_an_error_naming_the_namespace() -> None:
    others = [(f"o{b}", b) for b in range(1, naming.VNI_BLOCKS + 1)]
    with pytest.raises(ValueError, match="lab-x: all 4000 VNI blocks"):
        naming.choose_vni_block("lab-x", [], others)


def test_a_link_uses_the_smaller_block_its_ends_recorded() -> None:
    assert naming.link_block("lab-59", 221, 220) == naming.link_block("lab-59", 220, 221) == 220
    assert naming.link_block("lab-59", 0, 221) == 221
    assert naming.link_block("lab-59", 0, 0) == naming.vni_block("lab-59")  # dry runs: the hash
    assert naming.link_block("lab-59", 9999, -1) == naming.vni_block("lab-59")  # nonsense ignored
    assert naming.vni("lab-59", 7, 220) == 220 * naming.VNI_BLOCK_SIZE + 7
    assert naming.vni("lab-59", 7) == naming.vni("lab-59", 7, 0) == naming.vni("lab-27", 7)


@pytest.mark.parametrize(("vtep", "address"), [
    ("198.51.100.2", "198.51.100.2:51111"),
    ("2001:db8::2", "[2001:db8::2]:51111"),
    ("::1", "[::1]:51111"),
    ("::", "[::]:51111"),
    ("node1.example", "node1.example:51111"),
])
def test_host_port_brackets_an_ipv6_address(vtep: str, address: str) -> None:
    assert naming.host_port(vtep, 51111) == address


@pytest.mark.parametrize("check", [naming.k8s_name_problem, naming.netns_problem, naming.ifname_problem])
def test_a_trailing_line_break_is_refused(check: Any) -> None:
    # `re.match(...$)` accepts "r1\n": the rules match whole values.
    assert check("r1") is None
    assert check("r1\n") is not None
