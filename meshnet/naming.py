"""Interface-name rules, VNI allocation and the deterministic names meshnet gives kernel objects.

Pure: no I/O. Everything here is what makes a value safe to hand to `ip`: a name that passes
`check_ifname` cannot split an `ip -batch` line, start a comment or name another namespace.
"""

from __future__ import annotations

import hashlib
import re
import zlib

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

# Kubernetes object names (DNS-1123 subdomain) and namespaces (DNS-1123 label).
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
    if not _IFNAME_OK.match(name):
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
    if not name or len(name) > limit or not pattern.match(name):
        kind = "DNS-1123 label" if label else "DNS-1123 subdomain"
        return f"{name!r} is not a valid {kind} (lower-case letters, digits, '-', at most {limit} chars)"
    return None


def netns_problem(name: object) -> str | None:
    if not isinstance(name, str) or not _NETNS.match(name):
        return f"{name!r} is not a usable network-namespace name (letters, digits, '_', '.', '-'; ≤ 63)"
    return None


def vni_block(namespace: str) -> int:
    """The namespace's VNI block: stable across daemons and restarts, no coordination needed.

    A hash can put two namespaces in one block (1 in 4000 for a pair); links only clash when, in
    addition, they share a uid and meet on one node, and meshnet then reports the clash by name
    instead of failing with "file exists" as the original did.
    """
    return 1 + zlib.crc32(namespace.encode()) % VNI_BLOCKS


def vni(namespace: str, uid: int) -> int:
    """VNI of link `uid` in `namespace`: its namespace's block, offset by the uid."""
    if not 0 <= uid <= MAX_UID:
        raise ValueError(f"uid {uid} outside 0..{MAX_UID}")
    return vni_block(namespace) * VNI_BLOCK_SIZE + uid


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
    return ":".join(f"{b:02x}" for b in octets)


def attached_netns_name(netns_path: str) -> str:
    """The /var/run/netns name meshnetd gives a runtime's netns path that is not there already.

    Deterministic, so a daemon restart finds its own bind mounts again ("do not change this format").
    """
    digest = hashlib.sha256(netns_path.encode()).hexdigest()[:16]
    return f"mnp-{digest}"
