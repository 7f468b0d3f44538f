"""Interface-name rules, VNI allocation and the deterministic names meshnet gives kernel objects.

Pure: no I/O. Everything here is what makes a value safe to hand to `ip`: a name that passes
`check_ifname` cannot split an `ip -batch` line, start a comment or name another namespace.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import zlib
from collections.abc import Iterable

IFNAMSIZ = 15  # Linux: IFNAMSIZ is 16 including the terminating NUL
POD_NETWORK_IF = "eth0"

# Characters the kernel refuses in an interface name (`/`, `:`, whitespace) plus those that would
# change the meaning of an `ip -batch` line or a shell script (quotes, `#`, backslash).
_BAD_IFNAME = re.compile(r"[\s/:'\"#\\]")
# What a name may be made of: no shell or `ip -batch` metacharacters (`;`, `$`, backticks, ...) and
# no leading '-', which `ip` would read as an option.
_IFNAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Words of the `ip link` grammar: as an interface name they would be read as a keyword.
_IP_KEYWORDS = frozenset({
    "add", "address", "alias", "all", "broadcast", "del", "dev", "down", "group", "help", "index", "link",
    "master", "mtu", "name", "netns", "nomaster", "peer", "set", "show", "txqueuelen", "type", "up", "vf",
})

# Kubernetes object names (DNS-1123 subdomain) and namespaces (DNS-1123 label). Always used with
# fullmatch: `$` alone also matches before a trailing line break ("r1\n" would pass).
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# Network-namespace names reach `ip -n NAME` and `/var/run/netns/NAME`: keep them to a plain set.
_NETNS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

VXLAN_PORT = 4789
# VNIs are 24 bits. Each Kubernetes namespace gets a block of 4096 VNIs; a link's VNI is its uid
# inside its namespace's block. Blocks 1..4000 keep every VNI below 2**24 and clear of VNI 0-4095,
# which other tools on a node commonly use.
VNI_BLOCK_SIZE = 4096
VNI_BLOCKS = 4000
MAX_UID = VNI_BLOCK_SIZE - 1


def ifname_problem(name: object) -> str | None:
    """Why `name` is not a usable Linux interface name, or None when it is."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    if not name:
        return "must not be empty"
    if len(name) > IFNAMSIZ:
        return f"{name!r} is {len(name)} characters long; Linux allows at most {IFNAMSIZ}"
    if name in (".", ".."):
        return f"{name!r} is not allowed"
    bad = _BAD_IFNAME.search(name)
    if bad:
        return f"{name!r} contains {bad.group()!r}; whitespace, '/', ':', quotes, '#' and '\\' are not allowed"
    if not name.isprintable():
        return f"{name!r} contains a non-printable character"
    if not _IFNAME_OK.fullmatch(name):
        return f"{name!r}: only letters, digits, '_', '.' and '-' are allowed, starting with a letter or digit"
    if name in _IP_KEYWORDS:
        return f"{name!r} is a keyword of `ip link` and cannot name an interface"
    return None


def k8s_name_problem(name: object, *, label: bool = False) -> str | None:
    """Why `name` is not a valid Kubernetes object name (or namespace, with label=True)."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    limit = 63 if label else 253
    pattern = _DNS1123_LABEL if label else _DNS1123_SUBDOMAIN
    if not name or len(name) > limit or not pattern.fullmatch(name):
        kind = "DNS-1123 label" if label else "DNS-1123 subdomain"
        return f"{name!r} is not a valid {kind} (lower-case letters, digits, '-', at most {limit} chars)"
    return None


def netns_problem(name: object) -> str | None:
    if not isinstance(name, str) or not _NETNS.fullmatch(name):
        return f"{name!r} is not a usable network-namespace name (letters, digits, '_', '.', '-'; ≤ 63)"
    return None


def vni_block(namespace: str) -> int:
    """The namespace's home VNI block, from a hash: what a namespace gets when no other one has it.

    A hash alone puts two namespaces in one block with probability 1 in 4000 per pair, and their
    links then clash on any node where two share a uid (the kernel allows one vxlan per VNI and
    port: the original's "file exists"). So the block a namespace really uses is recorded in its
    pods' status (`choose_vni_block`); this is where the search for a free one starts.
    """
    return 1 + zlib.crc32(namespace.encode()) % VNI_BLOCKS


def valid_block(block: int) -> bool:
    return 1 <= block <= VNI_BLOCKS


def block_lost(namespace: str, block: int, others: Iterable[tuple[str, int]]) -> bool:
    """Whether `namespace` must give up `block`: a namespace with a smaller name recorded it too.

    Two namespaces whose first pods came up at the same moment can both pick a free-looking block;
    once each daemon sees the other's record, this rule decides the same everywhere who moves.
    """
    return any(ns < namespace and b == block for ns, b in others)


def choose_vni_block(namespace: str, own: Iterable[int], others: Iterable[tuple[str, int]]) -> int:
    """The VNI block a pod of `namespace` records when it comes alive (or when its block was lost).

    `own`: blocks pods of the namespace recorded already — the smallest it has not lost wins, so
    pods that came up at the same time on different nodes converge. Otherwise the first block,
    from the namespace's hash on, that no other namespace recorded. `others`: (namespace, block)
    of the pods of every other namespace.
    """
    taken = list(others)
    mine = [b for b in own if valid_block(b) and not block_lost(namespace, b, taken)]
    if mine:
        return min(mine)
    busy = {b for _, b in taken}
    start = vni_block(namespace) - 1
    for k in range(VNI_BLOCKS):
        block = 1 + (start + k) % VNI_BLOCKS
        if block not in busy:
            return block
    raise ValueError(f"namespace {namespace}: all {VNI_BLOCKS} VNI blocks are in use by other namespaces")


def link_block(namespace: str, *recorded: int) -> int:
    """The block of a link between two pods: the smaller of the blocks its ends recorded (both
    ends compute the same), or the namespace's hash when neither recorded one (dry runs)."""
    blocks = [b for b in recorded if valid_block(b)]
    return min(blocks) if blocks else vni_block(namespace)


def vni(namespace: str, uid: int, block: int = 0) -> int:
    """VNI of link `uid` in `namespace`: its block (`link_block`; the hash's when 0), offset by the uid."""
    if not 0 <= uid <= MAX_UID:
        raise ValueError(f"uid {uid} outside 0..{MAX_UID}")
    return (block if valid_block(block) else vni_block(namespace)) * VNI_BLOCK_SIZE + uid


# Every interface meshnet makes joins this link group ("mn" in ASCII). It marks what is meshnet's
# (garbage collection never touches another plugin's interfaces) and lets a DEL remove all of a
# pod's links in one kernel call (`ip link del group`), which is batched in the kernel: 1500 veths
# go in a quarter of a second instead of ~45 s one by one.
LINK_GROUP = 0x6D6E


def mac_address(namespace: str, pod: str, intf: str) -> str:
    """A stable, locally administered MAC for a pod's interface: the same after every restart, so
    router configurations and captures keyed on MACs keep working ("do not change this format")."""
    digest = hashlib.sha256(f"{namespace}/{pod}/{intf}".encode()).digest()
    octets = bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]  # unicast, locally administered
    # bytes.hex with a separator: "02:ab:..." as the per-octet join wrote it, a quarter of the
    # time (planning 1500 veths computes 3000 of these, twice in a late peer's ADD).
    return octets.hex(":")


def attached_netns_name(netns_path: str) -> str:
    """The /var/run/netns name meshnetd gives a runtime's netns path that is not there already.

    Deterministic, so a daemon restart finds its own bind mounts again ("do not change this format").
    """
    digest = hashlib.sha256(netns_path.encode()).hexdigest()[:16]
    return f"mnp-{digest}"


def host_port(host: str, port: int) -> str:
    """A gRPC address (a peer daemon behind its VTEP, or where to listen): `host:port`, and
    `[addr]:port` for IPv6 (a bare IPv6 address and a port would read as one longer address)."""
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False  # a host name: gRPC resolves it
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"
