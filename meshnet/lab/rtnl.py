"""The links of a lab namespace (name, kind, flags) straight from the kernel over rtnetlink, without
an `ip` process: `lab status` looks at every pod's links, and a harness polls it until every link is
up — one `ip -j -d addr show` per namespace made each poll of a 750-pod lab 750 processes.

The netlink socket is opened inside the namespace by a short-lived thread (meshnet.lab.netns_thread)
and keeps that namespace; the dump is read here. Everything read is the kernel's answer, parsed
defensively: a truncated or odd message ends the dump with what was read so far, never an exception
other than OSError."""

from __future__ import annotations

import socket
import struct
from typing import Any

from meshnet.lab.netns_thread import in_netns

NETLINK_ROUTE = 0
RTM_GETLINK = 18
RTM_NEWLINK = 16
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")

# The interface flags `ip -j` names (linux/if.h), in its order. Not M-DOWN: `ip` derives it from
# the state of the link's peer (IFLA_LINK), which `status` does not need.
FLAG_NAMES = (
    (0x8, "LOOPBACK"), (0x2, "BROADCAST"), (0x10, "POINTOPOINT"), (0x1000, "MULTICAST"), (0x80, "NOARP"),
    (0x200, "ALLMULTI"), (0x100, "PROMISC"), (0x400, "MASTER"), (0x800, "SLAVE"), (0x4000, "DEBUG"),
    (0x40000, "DORMANT"), (0x1, "UP"), (0x10000, "LOWER_UP"))
IFF_UP, IFF_RUNNING = 0x1, 0x40


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = start
    while i + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, i)
        if length < _RTATTR.size or i + length > end:
            break
        out[kind & 0x3FFF] = data[i + _RTATTR.size:i + length]  # without NLA_F_NESTED / NET_BYTEORDER
        i += _align(length)
    return out


def parse_links(data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The RTM_NEWLINK messages of one receive buffer as `ip -j` shaped entries (ifname, flags,
    linkinfo.info_kind), and whether the dump ended (DONE or an error)."""
    out: list[dict[str, Any]] = []
    i = 0
    while i + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, i)
        if length < _NLMSGHDR.size or i + length > len(data):
            return out, True
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return out, True
        body = i + _NLMSGHDR.size
        if kind == RTM_NEWLINK and body + _IFINFOMSG.size <= i + length:
            _family, _type, _index, flags, _change = _IFINFOMSG.unpack_from(data, body)
            attrs = _attrs(data, body + _IFINFOMSG.size, i + length)
            name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
            names = [n for bit, n in FLAG_NAMES if flags & bit]
            if flags & IFF_UP and not flags & IFF_RUNNING:
                names.insert(0, "NO-CARRIER")  # as `ip` prints it
            entry: dict[str, Any] = {"ifname": name, "flags": names}
            info = attrs.get(IFLA_LINKINFO)
            if info is not None:
                kind_raw = _attrs(info, 0, len(info)).get(IFLA_INFO_KIND)
                if kind_raw is not None:
                    entry["linkinfo"] = {"info_kind": kind_raw.split(b"\0", 1)[0].decode(errors="replace")}
            if name:
                out.append(entry)
        i += _align(length)
    return out, False


def links(netns: str, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """{ifname: entry} of every link in the named namespace; OSError when it cannot be read."""
    sock: socket.socket = in_netns(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE))
    with sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        request = _NLMSGHDR.pack(_NLMSGHDR.size + _IFINFOMSG.size, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        sock.send(request + _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        found: dict[str, dict[str, Any]] = {}
        done = False
        while not done:
            entries, done = parse_links(sock.recv(1 << 18))
            for e in entries:
                found[e["ifname"]] = e
        return found
