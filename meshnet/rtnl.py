"""A namespace's links and addresses straight from the kernel over rtnetlink, without an `ip`
process: `lab status` looks at every pod's links (`links`), and meshnetd's kernel view (`views`:
what `ip -j -d addr show` printed, for every namespace of a reconcile pass) is read this way — one
`ip` process per namespace made an idle daemon's 30 s pass over 250 pods cost ~10 % of a core.

The netlink socket is opened inside the namespace by a short-lived thread (meshnet.netns_thread)
and keeps that namespace; the dumps are read here and the socket closed. Everything read is the
kernel's answer, parsed defensively: a truncated or odd message ends the dump with what was read so
far, never an exception other than OSError."""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from meshnet.naming import ifname_problem
from meshnet.netns_thread import in_each_netns, in_netns

NETLINK_ROUTE = 0
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
NLM_F_REQUEST = 0x1
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
IFLA_ADDRESS = 1
IFLA_BROADCAST = 2
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_QDISC = 6
IFLA_TXQLEN = 13
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_GROUP = 27
IFLA_LINK_NETNSID = 37
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
IFA_BROADCAST = 4
IFA_CACHEINFO = 6
IFA_FLAGS = 8

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")
_BE16 = struct.Struct("!H")
_CACHEINFO = struct.Struct("=II")  # ifa_prefered, ifa_valid (then the stamps, unused)

# The interface flags (linux/if.h) in the order `ip` prints them. Not M-DOWN: `ip` derives it from
# a lookup of the link's IFLA_LINK index in its own namespace, meaningless for a veth whose peer is
# in another one (and nothing here reads it).
FLAG_NAMES = (
    (0x8, "LOOPBACK"), (0x2, "BROADCAST"), (0x10, "POINTOPOINT"), (0x1000, "MULTICAST"), (0x80, "NOARP"),
    (0x200, "ALLMULTI"), (0x100, "PROMISC"), (0x400, "MASTER"), (0x800, "SLAVE"), (0x4, "DEBUG"),
    (0x8000, "DYNAMIC"), (0x4000, "AUTOMEDIA"), (0x2000, "PORTSEL"), (0x20, "NOTRAILERS"), (0x1, "UP"),
    (0x10000, "LOWER_UP"), (0x20000, "DORMANT"), (0x40000, "ECHO"))
IFF_UP, IFF_RUNNING = 0x1, 0x40
_OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")
_LINK_TYPES = {1: "ether", 772: "loopback", 0xFFFE: "none", 0xFFFF: "void"}
_MACVLAN_MODES = {1: "private", 2: "vepa", 4: "bridge", 8: "passthru", 16: "source"}
_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
# ifa_flags `ip -j` prints as `"name": true` (IFA_F_SECONDARY is "secondary" for IPv4, "temporary"
# for IPv6; IFA_F_PERMANENT is printed inverted, as "dynamic").
_ADDR_FLAGS = ((0x02, "nodad"), (0x04, "optimistic"), (0x08, "dadfailed"), (0x10, "homeaddress"),
               (0x20, "deprecated"), (0x40, "tentative"), (0x100, "mngtmpaddr"), (0x200, "noprefixroute"),
               (0x400, "autojoin"), (0x800, "stable-privacy"))
IFA_F_SECONDARY, IFA_F_PERMANENT = 0x01, 0x80
IFLA_EXT_MASK = 29
RTEXT_FILTER_SKIP_STATS = 0x8  # the link dump without counters (`ip` without -s prints none)
_LINK_ATTRS = frozenset({IFLA_ADDRESS, IFLA_BROADCAST, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_QDISC, IFLA_TXQLEN,
                         IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_GROUP, IFLA_LINK_NETNSID})
_ADDR_ATTRS = frozenset({IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_BROADCAST, IFA_CACHEINFO, IFA_FLAGS})
_RECV = 1 << 18


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(data: bytes, start: int, end: int, wanted: frozenset[int] | None = None) -> dict[int, bytes]:
    """The attributes between `start` and `end` by type (only the `wanted` ones: a link carries ~35,
    and a pass over a node's pods walks thousands; the loop is kept tight for that)."""
    out: dict[int, bytes] = {}
    i = start
    unpack = _RTATTR.unpack_from
    while i + 4 <= end:
        length, kind = unpack(data, i)
        after = i + length
        if length < 4 or after > end:
            break
        kind &= 0x3FFF  # without NLA_F_NESTED / NET_BYTEORDER
        if wanted is None or kind in wanted:
            out[kind] = data[i + 4:after]
        i = (after + 3) & ~3
    return out


def _string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _u32(raw: bytes | None) -> int | None:
    return _U32.unpack_from(raw)[0] if raw is not None and len(raw) >= 4 else None


def _flag_names(flags: int) -> list[str]:
    names = [n for bit, n in FLAG_NAMES if flags & bit]
    if flags & IFF_UP and not flags & IFF_RUNNING:
        names.insert(0, "NO-CARRIER")  # as `ip` prints it
    return names


def _messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, flags, body start, message end) of each whole message in a receive buffer; a message
    claiming more than was received (or less than a header) ends the walk."""
    i = 0
    while i + _NLMSGHDR.size <= len(data):
        length, kind, flags, _seq, _pid = _NLMSGHDR.unpack_from(data, i)
        if length < _NLMSGHDR.size or i + length > len(data):
            yield NLMSG_ERROR, 0, i, i  # truncated: the dump ends here
            return
        yield kind, flags, i + _NLMSGHDR.size, i + length
        i += _align(length)


def _short_link(data: bytes, body: int, end: int) -> dict[str, Any] | None:
    """One RTM_NEWLINK message as an `ip -j` shaped entry (ifname, flags, linkinfo.info_kind):
    what `lab status` needs; None for a message without a name."""
    if body + _IFINFOMSG.size > end:
        return None
    _family, _type, _index, flags, _change = _IFINFOMSG.unpack_from(data, body)
    attrs = _attrs(data, body + _IFINFOMSG.size, end)
    name = _string(attrs.get(IFLA_IFNAME, b""))
    if not name:
        return None
    entry: dict[str, Any] = {"ifname": name, "flags": _flag_names(flags)}
    info = attrs.get(IFLA_LINKINFO)
    if info is not None:
        kind_raw = _attrs(info, 0, len(info)).get(IFLA_INFO_KIND)
        if kind_raw is not None:
            entry["linkinfo"] = {"info_kind": _string(kind_raw)}
    return entry


def _open() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


# How often `links` reads a namespace whose dump the kernel marks interrupted before it settles
# for the last read.
LINK_DUMP_ATTEMPTS = 3


def links(netns: str, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """{ifname: entry} of every link in the named namespace; OSError when it cannot be read (an
    answer the kernel cut short included: a partial list would call links "missing").

    A dump during which links came or went is marked interrupted by the kernel and may lack some
    that were there all along (`lab status` then called a link "missing"): it is read again."""
    request = _NLMSGHDR.pack(_NLMSGHDR.size + _IFINFOMSG.size, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    request += _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    found: dict[str, dict[str, Any]] = {}
    for _ in range(LINK_DUMP_ATTEMPTS):
        found = {}
        sock: socket.socket = in_netns(netns, _open)
        with sock:
            sock.settimeout(timeout)
            sock.bind((0, 0))
            try:
                for data, kind, body, end in _dump(sock, request, 1):
                    if kind == RTM_NEWLINK and (entry := _short_link(data, body, end)) is not None:
                        found[entry["ifname"]] = entry
            except DumpInterrupted:
                continue  # the last attempt's read is what is said
        break
    return found


# --- the full view: `ip -j -d addr show` ------------------------------------------------------------


class DumpInterrupted(OSError):
    """The namespace changed during a dump (NLM_F_DUMP_INTR): what was read may be inconsistent."""


def _dump(sock: socket.socket, request: bytes, seq: int) -> Iterator[tuple[bytes, int, int, int]]:
    """(buffer, type, body start, end) of each message of one dump; OSError on the kernel's error."""
    sock.send(request)
    interrupted = False
    while True:
        data = sock.recv(_RECV)
        if not data:
            raise OSError("netlink: the dump ended without NLMSG_DONE")
        for kind, flags, body, end in _messages(data):
            if end > body and _NLMSGHDR.unpack_from(data, body - _NLMSGHDR.size)[3] != seq:
                continue  # not an answer to this request
            interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
            if kind == NLMSG_DONE:
                # A dump that failed on its way (e.g. a filter naming a gone interface) says so here.
                code = _S32.unpack_from(data, body)[0] if end - body >= 4 else 0
                if code < 0:
                    raise OSError(-code, f"netlink dump: error {-code}")
                if interrupted:
                    raise DumpInterrupted(errno.EINTR, "netlink: the dump was interrupted by a change")
                return
            if kind == NLMSG_ERROR:
                code = _S32.unpack_from(data, body)[0] if end - body >= 4 else -1
                if end == body or code == 0:
                    raise OSError("netlink: truncated answer")
                raise OSError(-code, f"netlink dump: error {-code}")
            yield data, kind, body, end


def _mac(raw: bytes) -> str:
    return raw.hex(":")


def _ip(raw: bytes | None) -> str | None:
    """An address as `ip` prints it (inet_ntop: `ip`'s own formatting, and C-fast)."""
    if raw is None:
        return None
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return None


def _vxlan(data: dict[int, bytes]) -> dict[str, Any]:
    """The vxlan details `ip -j -d` prints that meshnet compares (and the v6 forms)."""
    out: dict[str, Any] = {}
    vni = _u32(data.get(1))  # IFLA_VXLAN_ID
    if vni is not None:
        out["id"] = vni
    for v4, v6, name in ((2, 16, "remote"), (4, 17, "local")):  # GROUP(6), LOCAL(6)
        raw = data.get(v4) if v4 in data else data.get(v6)
        addr = _ip(raw)
        if addr is None or raw is None or not any(raw):
            continue  # absent or unspecified: `ip` prints nothing
        multicast = raw[0] >= 0xFF if len(raw) == 16 else 224 <= raw[0] <= 239
        out[("group" if name == "remote" and multicast else name) + ("6" if v4 not in data else "")] = addr
    port = data.get(15)  # IFLA_VXLAN_PORT, network order
    if port is not None and len(port) >= 2:
        out["port"] = _BE16.unpack_from(port)[0]
    return out


def _link_entry(data: bytes, body: int, end: int, slim: bool = False) -> dict[str, Any] | None:
    if body + _IFINFOMSG.size > end:
        return None
    _family, link_type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
    attrs = _attrs(data, body + _IFINFOMSG.size, end, _LINK_ATTRS)
    name = _string(attrs.get(IFLA_IFNAME, b""))
    if not name:
        return None
    if slim:
        return _slim_link(index, name, flags, attrs)
    entry: dict[str, Any] = {"ifindex": index, "ifname": name, "flags": _flag_names(flags)}
    link = _u32(attrs.get(IFLA_LINK))
    netnsid = attrs.get(IFLA_LINK_NETNSID)
    if link is not None and netnsid is not None:
        entry["link_index"] = link  # an index in another namespace (`ip` prints `link` otherwise)
    for key, attr in (("mtu", IFLA_MTU), ("txqlen", IFLA_TXQLEN)):
        value = _u32(attrs.get(attr))
        if value is not None:
            entry[key] = value
    if IFLA_QDISC in attrs:
        entry["qdisc"] = _string(attrs[IFLA_QDISC])
    state = attrs.get(IFLA_OPERSTATE)
    if state:
        entry["operstate"] = _OPERSTATES[state[0]] if state[0] < len(_OPERSTATES) else str(state[0])
    group = _u32(attrs.get(IFLA_GROUP))
    if group is not None:
        entry["group"] = "default" if group == 0 else str(group)  # as iproute2's table names them
    if link_type in _LINK_TYPES:
        entry["link_type"] = _LINK_TYPES[link_type]
        if link_type in (1, 772):
            for key, attr in (("address", IFLA_ADDRESS), ("broadcast", IFLA_BROADCAST)):
                if attr in attrs:
                    entry[key] = _mac(attrs[attr])
    if netnsid is not None and len(netnsid) >= 4:
        entry["link_netnsid"] = _S32.unpack_from(netnsid)[0]
    linkinfo = _linkinfo(attrs)
    if linkinfo is not None:
        entry["linkinfo"] = linkinfo
    return entry


def _linkinfo(attrs: dict[int, bytes]) -> dict[str, Any] | None:
    """`linkinfo` as `ip -j -d` prints it: the kind, and a vxlan's or macvlan's data."""
    info = attrs.get(IFLA_LINKINFO)
    if info is None:
        return None
    nested = _attrs(info, 0, len(info))
    if IFLA_INFO_KIND not in nested:
        return None
    kind = _string(nested[IFLA_INFO_KIND])
    linkinfo: dict[str, Any] = {"info_kind": kind}
    raw = nested.get(IFLA_INFO_DATA)
    if raw is not None and kind == "vxlan":
        linkinfo["info_data"] = _vxlan(_attrs(raw, 0, len(raw)))
    elif raw is not None and kind == "macvlan":
        mode = _u32(_attrs(raw, 0, len(raw)).get(1))  # IFLA_MACVLAN_MODE
        if mode is not None:
            linkinfo["info_data"] = {"mode": _MACVLAN_MODES.get(mode, "unknown")}
    return linkinfo


# Slim entries (`views(..., slim=True)`, `ends(..., slim=True)`): only the keys the daemon reads
# (meshnet.daemon.kernel: ifname, flags, group, linkinfo, addr_info's family/local/prefixlen/scope),
# their repeated values shared. A daemon holds a whole namespace's view through a reconcile pass and
# a peer page's ends through its apply: 1500 full entries are ~2.7 MiB, slim ones about a third.
# Each table is bounded: flags, groups and kinds come from whoever made the interfaces.
_SLIM_FLAGS: dict[int, tuple[str, ...]] = {}
_SLIM_GROUPS: dict[int, str] = {}
_SLIM_KINDS: dict[str, dict[str, Any]] = {}
_SLIM_BOUND = 256


def _shared(table: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """The one value kept for `key` (made and kept while the table has room; read only after)."""
    value = table.get(key)
    if value is None:
        value = make()
        if len(table) < _SLIM_BOUND:
            table[key] = value
    return value


def _slim_link(index: int, name: str, flags: int, attrs: dict[int, bytes]) -> dict[str, Any]:
    entry: dict[str, Any] = {"ifindex": index, "ifname": name,
                             "flags": _shared(_SLIM_FLAGS, flags, lambda: tuple(_flag_names(flags)))}
    group = _u32(attrs.get(IFLA_GROUP))
    if group is not None:
        entry["group"] = _shared(_SLIM_GROUPS, group, lambda: "default" if group == 0 else str(group))
    linkinfo = _linkinfo(attrs)
    if linkinfo is not None:
        # Data-less kinds (veth, ...) share one dict per kind: nothing changes an entry's linkinfo.
        entry["linkinfo"] = linkinfo if "info_data" in linkinfo else \
            _shared(_SLIM_KINDS, linkinfo["info_kind"], lambda: linkinfo)
    return entry


def slimmed(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A full entry cut to a slim one's keys (the tests compare the two reads with it)."""
    out = {k: entry[k] for k in ("ifindex", "ifname", "group", "linkinfo") if k in entry}
    out["flags"] = tuple(entry.get("flags", ()))
    if "addr_info" in entry:
        out["addr_info"] = [{k: a[k] for k in ("family", "local", "prefixlen", "scope")} for a in entry["addr_info"]]
    return out


def _addr_entry(data: bytes, body: int, end: int, slim: bool = False) -> tuple[int, dict[str, Any]] | None:
    if body + _IFADDRMSG.size > end:
        return None
    family, prefixlen, flags8, scope, index = _IFADDRMSG.unpack_from(data, body)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    attrs = _attrs(data, body + _IFADDRMSG.size, end, _ADDR_ATTRS)
    flags = _u32(attrs.get(IFA_FLAGS)) or flags8
    local, peer = _ip(attrs.get(IFA_LOCAL)), _ip(attrs.get(IFA_ADDRESS))
    if local is None and peer is None:
        return None
    v4 = family == socket.AF_INET
    if slim:
        return index, {"family": "inet" if v4 else "inet6", "local": local or peer, "prefixlen": prefixlen,
                       "scope": _SCOPES.get(scope) or str(scope)}
    entry: dict[str, Any] = {"family": "inet" if v4 else "inet6", "local": local or peer}
    if local is not None and peer is not None and peer != local:
        entry["address"] = peer  # point-to-point: the far end
    entry["prefixlen"] = prefixlen
    bcast = _ip(attrs.get(IFA_BROADCAST))
    if bcast is not None:
        entry["broadcast"] = bcast
    entry["scope"] = _SCOPES.get(scope, str(scope))
    if not flags & IFA_F_PERMANENT:
        entry["dynamic"] = True
    if flags & IFA_F_SECONDARY:
        entry["secondary" if v4 else "temporary"] = True
    for bit, name in _ADDR_FLAGS:
        if flags & bit:
            entry[name] = True
    if IFA_LABEL in attrs:
        entry["label"] = _string(attrs[IFA_LABEL])
    cache = attrs.get(IFA_CACHEINFO)
    if cache is not None and len(cache) >= _CACHEINFO.size:
        preferred, valid = _CACHEINFO.unpack_from(cache)
        entry["valid_life_time"], entry["preferred_life_time"] = valid, preferred
    return index, entry


# The attribute every link request carries: no counters.
_SKIP_STATS = _RTATTR.pack(8, IFLA_EXT_MASK) + _U32.pack(RTEXT_FILTER_SKIP_STATS)


def _read_view(sock: socket.socket, timeout: float, slim: bool = False) -> dict[str, dict[str, Any]]:
    """One dump of the links and one of the addresses through a socket of the namespace."""
    sock.settimeout(timeout)
    sock.bind((0, 0))
    by_index: dict[int, dict[str, Any]] = {}
    request = _NLMSGHDR.pack(_NLMSGHDR.size + _IFINFOMSG.size + len(_SKIP_STATS), RTM_GETLINK,
                             NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    for data, kind, body, end in _dump(sock, request + _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _SKIP_STATS, 1):
        if kind == RTM_NEWLINK and (entry := _link_entry(data, body, end, slim)) is not None:
            entry["addr_info"] = []
            by_index[entry["ifindex"]] = entry
    # One address dump of every family; should the kernel mark it interrupted, one per family:
    # a family's dump is interrupted only when that family's addresses change meanwhile, and
    # IPv6's do for seconds after hundreds of interfaces come up (duplicate address detection),
    # which must not cost the IPv4 read. A family whose dump keeps being interrupted is read
    # interface by interface (each small dump consistent), not through `ip`.
    try:
        found = _addresses(sock, socket.AF_UNSPEC, 2, slim)
    except DumpInterrupted:
        found = []
        for seq, family in ((3, socket.AF_INET), (7, socket.AF_INET6)):
            for attempt in range(_FAMILY_TRIES):
                try:
                    found += _addresses(sock, family, seq, slim)
                    break
                except DumpInterrupted:
                    if attempt == _FAMILY_TRIES - 1:
                        found += _family_by_interface(sock, family, by_index, slim)
                except OSError as e:
                    if e.errno != errno.EAFNOSUPPORT or family != socket.AF_INET6:
                        raise
                    break  # a kernel without IPv6
    for index, entry in found:
        link = by_index.get(index)
        if link is not None:  # an address of a link made after the link dump: the next read has both
            link["addr_info"].append(entry)
    return {e["ifname"]: e for e in by_index.values()}


_FAMILY_TRIES = 2


def _addresses(sock: socket.socket, family: int, seq: int, slim: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """One namespace-wide address dump of `family` (AF_UNSPEC: every family): (index, entry)."""
    request = _NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) \
        + _IFADDRMSG.pack(family, 0, 0, 0, 0)
    return [f for data, kind, body, end in _dump(sock, request, seq)
            if kind == RTM_NEWADDR and (f := _addr_entry(data, body, end, slim)) is not None]


def _family_by_interface(sock: socket.socket, family: int, by_index: dict[int, dict[str, Any]], slim: bool = False
                         ) -> list[tuple[int, dict[str, Any]]]:
    """One family's addresses of the links read, one dump per interface (needs the kernel's strict
    checking for the index filter: EINTR when it has none, so the caller's fallback reads via `ip`)."""
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
    except OSError as e:
        raise DumpInterrupted(errno.EINTR, "netlink: the dump was interrupted by a change") from e
    out: list[tuple[int, dict[str, Any]]] = []
    for index in list(by_index):
        got = _family_of(sock, family, index, 5, slim)
        out += [(index, a) for a in got or ()]  # None: gone since the link dump (the next read knows)
    return out


def views(names: Iterable[str], timeout: float = 5.0, tries: int = 5, slim: bool = False
          ) -> dict[str, dict[str, dict[str, Any]] | OSError]:
    """{netns: {ifname: entry}} for each named namespace, each entry shaped as `ip -j -d addr show`
    prints it (the keys meshnet reads: ifindex, ifname, flags, mtu, qdisc, operstate, group,
    link_type, address, link_index/link_netnsid, linkinfo with vxlan id/remote/local/port or macvlan
    mode, addr_info with family/local/prefixlen/scope and address flags), or the OSError that
    namespace gave (gone, a bad name, the kernel's error). One thread opens a socket in each
    namespace of a chunk in turn; the dumps are read here, each socket closed after its namespace's
    read (at most CHUNK open at once, whatever the number of pods). `slim`: entries with only the
    keys the daemon reads (`_slim_link`)."""
    unique = list(dict.fromkeys(names))
    out: dict[str, dict[str, dict[str, Any]] | OSError] = {}
    for first in range(0, len(unique), CHUNK):
        chunk = unique[first:first + CHUNK]
        socks = in_each_netns(chunk, _open)
        try:
            for ns, sock in zip(chunk, socks, strict=True):
                out[ns] = sock if isinstance(sock, OSError) else _read_one(ns, sock, timeout, tries, slim)
        finally:
            for sock in socks:
                if isinstance(sock, socket.socket):
                    sock.close()  # closed already unless the loop above was cut short
    return out


CHUNK = 64


# --- some interfaces of one namespace: what a peer call or a race needs ----------------------------

SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12  # the kernel honours a dump request's filters (an address dump's ifindex)
_GET_BATCH = 64  # link requests sent at once (their answers queue on the socket)


def ends(netns: str, names: Iterable[str], timeout: float = 5.0, tries: int = 5,
         slim: bool = False) -> dict[str, dict[str, Any]] | OSError:
    """{ifname: entry} for the named interfaces of one namespace (an absent one left out), each
    entry as `views` gives it, or the OSError the namespace gave.

    Asked interface by interface (one RTM_GETLINK by name, one address dump filtered to its
    index), so the cost follows the names asked, not the namespace: a peer call's page of 512
    ends in a namespace of 1500 read the whole namespace each time. And no dump spans the
    namespace: the kernel marks a namespace-wide IPv6 address dump interrupted while it runs
    duplicate address detection on hundreds of new interfaces (every change bumps the family's
    generation), which made such reads fall back to `ip` for a second; one interface's dump fits
    in one message batch and is read again if it is marked all the same."""
    try:
        sock: socket.socket = in_netns(netns, _open)
    except OSError as e:
        return e
    with sock:
        try:
            sock.settimeout(timeout)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            # A name Linux would refuse is no interface: never put in a request (callers pass names
            # a peer's request carried).
            found = _get_links(sock, [n for n in dict.fromkeys(names) if not ifname_problem(n)], slim)
            for name, entry in list(found.items()):
                addrs = _addresses_of(sock, entry["ifindex"], tries, slim)
                if addrs is None:
                    del found[name]  # deleted since its link was read: absent, as a later dump would say
                else:
                    entry["addr_info"] = addrs
            return found
        except OSError as e:
            return e


def _get_links(sock: socket.socket, names: list[str], slim: bool = False) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for first in range(0, len(names), _GET_BATCH):
        chunk = names[first:first + _GET_BATCH]
        requests = []
        for i, name in enumerate(chunk):
            raw = name.encode() + b"\0"
            attr = _RTATTR.pack(4 + len(raw), IFLA_IFNAME) + raw + b"\0" * (_align(len(raw)) - len(raw))
            payload = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr + _SKIP_STATS
            requests.append(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), RTM_GETLINK, NLM_F_REQUEST,
                                           _SEQ_BASE + i, 0) + payload)
        sock.send(b"".join(requests))
        waiting = set(range(_SEQ_BASE, _SEQ_BASE + len(chunk)))
        while waiting:
            data = sock.recv(_RECV)
            if not data:
                raise OSError("netlink: no answer to a link request")
            for kind, _flags, body, end in _messages(data):
                seq = _NLMSGHDR.unpack_from(data, body - _NLMSGHDR.size)[3] if end > body else -1
                if seq not in waiting:
                    if kind == NLMSG_ERROR and end == body:
                        raise OSError("netlink: truncated answer")
                    continue  # not an answer to these requests
                waiting.discard(seq)
                if kind == NLMSG_ERROR:
                    code = _S32.unpack_from(data, body)[0] if end - body >= 4 else -1
                    if code == -errno.ENODEV:
                        continue  # no such interface
                    raise OSError(-code if code < 0 else errno.EIO, f"netlink: link {chunk[seq - _SEQ_BASE]!r}: "
                                                                   f"error {-code}")
                if kind == RTM_NEWLINK and (entry := _link_entry(data, body, end, slim)) is not None \
                        and entry["ifname"] == chunk[seq - _SEQ_BASE]:
                    found[entry["ifname"]] = entry
    return found


_SEQ_BASE = 1000  # link requests' sequence numbers (dumps use 1 to 7)
_UNSPEC_FILTER = True  # an address dump of every family honours the index filter (see _addresses_of)


def _addresses_of(sock: socket.socket, index: int, tries: int, slim: bool = False) -> list[dict[str, Any]] | None:
    """The addresses of one interface, IPv4 then IPv6 (as a full dump lists them), or None when the
    interface is gone. One dump of every family, filtered to the index (a third fewer round trips
    than one per family); should a family of this kernel refuse such a filter, one dump per family
    from then on."""
    global _UNSPEC_FILTER
    if _UNSPEC_FILTER:
        try:
            return _family_of(sock, socket.AF_UNSPEC, index, tries, slim)
        except DumpInterrupted:
            raise
        except OSError:
            _UNSPEC_FILTER = False  # read per family below, now and later
    out: list[dict[str, Any]] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        got = _family_of(sock, family, index, tries, slim)
        if got is None:
            return None
        out += got
    return out


def _family_of(sock: socket.socket, family: int, index: int, tries: int,
               slim: bool = False) -> list[dict[str, Any]] | None:
    """One family's addresses of one interface (a dump filtered to its index: the socket has strict
    checking on), read again while the kernel marks it interrupted; None when the interface is gone."""
    seq = 4 if family == socket.AF_INET else 5 if family == socket.AF_INET6 else 6
    request = _NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) \
        + _IFADDRMSG.pack(family, 0, 0, 0, index)
    for attempt in range(tries):
        if attempt:
            time.sleep(0.005 * attempt)
        try:
            return [found[1] for data, kind, body, end in _dump(sock, request, seq)
                    if kind == RTM_NEWADDR and (found := _addr_entry(data, body, end, slim)) is not None
                    and found[0] == index]
        except DumpInterrupted:
            if attempt == tries - 1:
                raise
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            if e.errno != errno.EAFNOSUPPORT or family != socket.AF_INET6:
                raise
            return []  # a kernel without IPv6
    raise DumpInterrupted(errno.EINTR, "netlink: the dump was interrupted by a change")


def _read_one(ns: str, sock: socket.socket, timeout: float, tries: int,
              slim: bool = False) -> dict[str, dict[str, Any]] | OSError:
    """One namespace's view; a dump the kernel marks interrupted (links or addresses changing
    meanwhile, e.g. hundreds being made) is read again, and after `tries` the DumpInterrupted
    (errno EINTR) is returned: never a partial view taken for the namespace's state."""
    last: OSError = OSError(f"namespace {ns!r}: not read")
    for attempt in range(tries):
        try:
            if attempt:  # a fresh socket in the same namespace: the old one may hold a half-read dump
                time.sleep(0.01 * attempt)
                sock = in_netns(ns, _open)
            with sock:
                return _read_view(sock, timeout, slim)
        except DumpInterrupted as e:
            last = e
        except OSError as e:
            return e
    return last
