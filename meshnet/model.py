"""Topology resources as frozen dataclasses: parse raw dicts once, validate everything once.

Input comes from Kubernetes YAML files (any mix of Topology, Pod and StatefulSet documents) and
from the API (Topology objects as the API server returns them). Nothing downstream sees a raw
value: names are checked by `naming`, addresses by `ipaddress`, numbers by range.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from meshnet import naming

GROUP = "networkop.co.uk"
VERSION = "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Topology"
PLURAL = "topologies"
LOCALHOST = "localhost"  # peer_pod value meaning "a macvlan on the node's interface peer_intf"

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# Ours, not in the original: what leaves this end (each end's Topology describes its own end, so
# an asymmetric link is two different ends): `state`, `impairments`, `local_ips`, `local_mac`.
_LINK_FIELDS = {"uid", "peer_pod", "local_intf", "peer_intf", "local_ip", "peer_ip", "mtu",
                "state", "impairments", "local_ips", "local_mac"}
ADMIN_STATES = ("up", "down")  # a link end as declared: cable plugged or pulled
MAX_EXTRA_IPS = 64
_REQUIRED_LINK_FIELDS = ("uid", "peer_pod", "local_intf", "peer_intf")


class ManifestError(ValueError):
    """A resource meshnet refuses. Every problem names the source, the object, the uid and the field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _where(source: str, obj: str, uid: object = None, fld: str | None = None) -> str:
    parts = [p for p in (source, obj) if p]
    if uid is not None:
        parts.append(f"link uid {uid}")
    if fld:
        parts.append(fld)
    return ": ".join(parts)


# --- impairments: units as `tc` spells them, parsed once into numbers -------------------------------

_TIME = re.compile(r"^(\d+(?:\.\d+)?)(us|usec|ms|msec|s|sec)$")
_TIME_US = {"us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 1_000_000, "sec": 1_000_000}
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)$")
# tc's units: `bit` suffixes are bits per second, `bps` suffixes BYTES per second (tc's own spelling).
_RATE_BPS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
             "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
MAX_DELAY_US = 60_000_000  # a minute: beyond that a "link" is a black hole, use `state: down`
MIN_RATE_BPS = 8_000  # 8kbit: below that tbf cannot hold even one full-size frame per second
MAX_RATE_BPS = 10**12  # 1tbit; tbf takes 64-bit rates
DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")  # netem's built-in delay tables

# field -> unit kind. Everything but `rate` needs netem; a correlation only means something next to its value.
IMPAIRMENT_FIELDS: dict[str, str] = {
    "delay": "time", "jitter": "time", "delay_correlation": "percent", "distribution": "enum",
    "loss": "percent", "loss_correlation": "percent",
    "rate": "rate",
    "corrupt": "percent", "corrupt_correlation": "percent",
    "duplicate": "percent", "duplicate_correlation": "percent",
    "reorder": "percent", "reorder_correlation": "percent",
}


def format_time(us: int) -> str:
    return f"{us // 1000}ms" if us % 1000 == 0 else f"{us}us"


def format_percent(value: float) -> str:
    # Never an exponent ("1e-05%"), which tc would not parse.
    return f"{value:.6f}".rstrip("0").rstrip(".") + "%"


def format_rate(bps: int) -> str:
    for unit, factor in (("tbit", 10**12), ("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps % factor == 0:
            return f"{bps // factor}{unit}"
    return f"{bps}bit"


@dataclass(frozen=True)
class Impairments:
    """What `tc` does to traffic leaving one link end. Times in microseconds, rates in bit/s,
    percents as floats 0..100; 0 (or "") means "not set"."""

    delay: int = 0
    jitter: int = 0
    delay_correlation: float = 0.0
    distribution: str = ""
    loss: float = 0.0
    loss_correlation: float = 0.0
    rate: int = 0
    corrupt: float = 0.0
    corrupt_correlation: float = 0.0
    duplicate: float = 0.0
    duplicate_correlation: float = 0.0
    reorder: float = 0.0
    reorder_correlation: float = 0.0

    @property
    def netem_fields(self) -> tuple[str, ...]:
        """The fields set that only netem implements (everything but the rate)."""
        return tuple(f for f in IMPAIRMENT_FIELDS if f != "rate" and getattr(self, f))

    @property
    def needs_netem(self) -> bool:
        return bool(self.netem_fields)

    def to_api(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, kind in IMPAIRMENT_FIELDS.items():
            value = getattr(self, name)
            if not value:
                continue
            out[name] = (format_time(value) if kind == "time" else format_rate(value) if kind == "rate"
                         else value if kind == "enum" else format_percent(value))
        return out


def _parse_impairments(raw: object, here: str, problems: list[str], sep: str = ": ") -> Impairments | None:
    where = f"{here}{sep}impairments"  # sep ".": a status field path (status.links[0].impairments)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping such as {{delay: 20ms, loss: 1%}}, not {raw!r}")
        return None
    before = len(problems)
    unknown = sorted(map(str, set(raw) - set(IMPAIRMENT_FIELDS)))
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(IMPAIRMENT_FIELDS)})")
    values: dict[str, Any] = {}
    for name, kind in IMPAIRMENT_FIELDS.items():
        if name not in raw:
            continue
        value, fld = raw[name], f"{where}.{name}"
        text = value.strip() if isinstance(value, str) else None
        if kind == "enum":
            if value not in DISTRIBUTIONS:
                problems.append(f"{fld}: {value!r} is not one of {', '.join(DISTRIBUTIONS)}")
            else:
                values[name] = value
            continue
        if text is None:
            example = {"time": "20ms", "percent": "1%", "rate": "10mbit"}[kind]
            problems.append(f"{fld}: must be a string with a unit, such as {example}, not {value!r}")
            continue
        if text.startswith("-"):
            problems.append(f"{fld}: {value!r} is negative")
            continue
        if kind == "time":
            m = _TIME.match(text)
            if not m:
                problems.append(f"{fld}: {value!r} is not a time: a number and one of us, ms, s (e.g. 20ms)")
                continue
            us = round(float(m.group(1)) * _TIME_US[m.group(2)])
            if us > MAX_DELAY_US:
                problems.append(f"{fld}: {value!r} is more than 60s")
                continue
            values[name] = us
        elif kind == "percent":
            m = _PERCENT.match(text)
            if not m:
                problems.append(f"{fld}: {value!r} is not a percentage such as 1% or 0.5%")
                continue
            pct = float(m.group(1))
            if pct > 100:
                problems.append(f"{fld}: {value!r} is more than 100%")
                continue
            values[name] = pct
        else:
            m = _RATE.match(text)
            if not m:
                problems.append(f"{fld}: {value!r} is not a rate: a number and one of "
                                f"{', '.join(_RATE_BPS)} (e.g. 10mbit; tc's 'bps' means bytes/s)")
                continue
            bps = round(float(m.group(1)) * _RATE_BPS[m.group(2)])
            if bps == 0:
                problems.append(f"{fld}: {value!r} is zero; to stop traffic declare `state: down`")
            elif not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
                problems.append(f"{fld}: {value!r} is outside 8kbit..1tbit")
            else:
                values[name] = bps
    if len(problems) > before:
        return None
    # netem's own dependencies, refused here rather than by `tc` half-way through an ADD.
    needs = {"jitter": "delay", "delay_correlation": "jitter", "distribution": "jitter",
             "loss_correlation": "loss", "corrupt_correlation": "corrupt",
             "duplicate_correlation": "duplicate", "reorder": "delay", "reorder_correlation": "reorder"}
    for name, base in needs.items():
        if values.get(name) and not values.get(base):
            problems.append(f"{where}.{name}: needs {base} to be set (netem's {name} qualifies the {base})")
    if len(problems) > before:
        return None
    result = Impairments(**values)
    return result if result != Impairments() else None


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _parse_mac(value: object, where: str, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _MAC.match(value.lower()):
        problems.append(f"{where}: {value!r} is not a MAC address such as 02:00:00:00:00:01")
        return None
    mac = value.lower()
    if int(mac[:2], 16) & 1:
        problems.append(f"{where}: {value!r} is a multicast address; an interface needs a unicast one")
        return None
    if mac == "00:00:00:00:00:00":
        problems.append(f"{where}: {value!r} is all zeros")
        return None
    return mac


def _parse_ips(value: object, where: str, local_ip: IPInterface | None, problems: list[str]) -> tuple[IPInterface, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{where}: must be a list of CIDR strings such as [2001:db8::1/64], not {value!r}")
        return ()
    if len(value) > MAX_EXTRA_IPS:
        problems.append(f"{where}: {len(value)} addresses; at most {MAX_EXTRA_IPS}")
        return ()
    out: list[IPInterface] = []
    for i, item in enumerate(value):
        if item is None or item == "":
            problems.append(f"{where}[{i}]: must not be empty")
            continue
        ip = _parse_ip(item, f"{where}[{i}]", problems)
        if ip is None:
            continue
        if ip == local_ip or ip in out:
            problems.append(f"{where}[{i}]: {ip} is listed twice (local_ip and local_ips count together)")
            continue
        out.append(ip)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Link:
    uid: int
    peer_pod: str
    local_intf: str
    peer_intf: str
    local_ip: IPInterface | None = None
    peer_ip: IPInterface | None = None
    mtu: int | None = None
    # This end only (ours): administrative state, what `tc` does to traffic leaving it, addresses
    # beside local_ip, and a MAC instead of the derived one. The peer's Topology says its own.
    state: str = "up"
    impairments: Impairments | None = None
    local_ips: tuple[IPInterface, ...] = ()
    local_mac: str | None = None

    @property
    def is_macvlan(self) -> bool:
        return self.peer_pod == LOCALHOST

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "uid": self.uid,
            "peer_pod": self.peer_pod,
            "local_intf": self.local_intf,
            "peer_intf": self.peer_intf,
        }
        if self.local_ip is not None:
            out["local_ip"] = str(self.local_ip)
        if self.peer_ip is not None:
            out["peer_ip"] = str(self.peer_ip)
        if self.mtu is not None:
            out["mtu"] = self.mtu
        if self.state != "up":
            out["state"] = self.state
        if self.impairments is not None:
            out["impairments"] = self.impairments.to_api()
        if self.local_ips:
            out["local_ips"] = [str(ip) for ip in self.local_ips]
        if self.local_mac is not None:
            out["local_mac"] = self.local_mac
        return out

    def mirrored(self, pod: str) -> Link:
        """The same link as its peer pod `pod`'s Topology must describe it (the per-end fields,
        state to local_mac, are the peer's own choice and stay at their defaults)."""
        return Link(self.uid, pod, self.peer_intf, self.local_intf, self.peer_ip, self.local_ip, self.mtu)


@dataclass(frozen=True, slots=True)
class Skip:
    pod_name: str
    link_id: int


LINK_KINDS = ("", "veth", "vxlan", "macvlan")  # "" while the link is pending (no kind chosen yet)
LINK_STATES = ("up", "pending", "error")


@dataclass(frozen=True, slots=True)
class LinkStatus:
    uid: int
    kind: str  # veth | vxlan | macvlan
    state: str  # up | pending | error
    message: str = ""
    # The pod's interface meshnet made for this link: the only names garbage collection may remove.
    intf: str = ""
    # What is in force on this pod's end (issue 15; ends.EndReport): its administrative state
    # ("" while pending), the impairments this node applies, and the declared ones it cannot.
    admin: str = ""
    impairments: Impairments | None = None
    unavailable: tuple[str, ...] = ()

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uid": self.uid, "kind": self.kind, "state": self.state}
        if self.message:
            out["message"] = _bounded_text(self.message)
        if self.intf:
            out["intf"] = self.intf
        if self.admin:
            out["admin"] = self.admin
        if self.impairments is not None:
            out["impairments"] = self.impairments.to_api()
        if self.unavailable:
            out["unavailable"] = list(self.unavailable)
        return out

    @property
    def in_force(self) -> str:
        """One line for people: `down`, `delay 20ms, rate 10mbit (loss unavailable)`, or ""."""
        parts = ["down"] if self.admin == "down" else []
        if self.impairments is not None:
            parts += [f"{k} {v}" for k, v in self.impairments.to_api().items()]
        text = ", ".join(parts)
        if self.unavailable:
            text += f"{' ' if text else ''}({', '.join(self.unavailable)} unavailable on this node)"
        return text


# --- status: written by every node's daemon, so read back as untrusted as a user's spec -------------
#
# Whoever can write one Topology's status (any node's service account) must not be able to steer
# another node's daemon: every value is checked as strictly as a spec value, and a status with any
# problem counts as "pod not alive" (its values are dropped, never rendered). The CRD's status
# schema (manifests/base/crd.yaml) states the same rules; tests/test_manifests.py checks both
# against one corpus (tests/bad/status/).

MAX_TEXT = 4096  # messages and plumbing_error: display only, but bounded (logs, kubectl, etcd)
MAX_STATUS_ITEMS = naming.MAX_UID + 1  # one entry per link uid at most
# CNI's container id rule (^[A-Za-z0-9][A-Za-z0-9_.-]*$), bounded: runtimes use 64 hex digits.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
# Where runtimes keep pod namespaces: a name under /var/run/netns or /run/netns, or a process's
# /proc/<pid>/ns/net. No `..`, no other directory; /proc/1 is the host's own namespace and
# /proc/self the reader's, so neither is a pod's.
_NETNS_PATH = re.compile(r"(?:/var/run/netns/|/run/netns/)[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
                         r"|/proc/(?:[2-9]|[1-9][0-9]{1,9})/ns/net")
# Free text may carry tabs and line breaks (an `ip` error), no other control character (terminal
# escapes in `kubectl get` or a log).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_STATUS_FIELDS = ("src_ip", "net_ns", "container_id", "node", "plumbing_error")
_NOT_OURS = frozenset({naming.POD_NETWORK_IF, "lo"})


def _bounded_text(text: str) -> str:
    """What a daemon writes as free text: within the limits it checks when reading it back."""
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _text_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if len(value) > MAX_TEXT:
        return f"is {len(value)} characters long; at most {MAX_TEXT}"
    if _CONTROL.search(value):
        return f"{value[:80]!r} contains a control character"
    return None


def _int_problem(value: object, low: int, high: int) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"must be an integer, not {value!r:.80}"
    if not low <= value <= high:
        return f"{value} is outside {low}..{high}"
    return None


def vtep_problem(value: object) -> str | None:
    """Why `value` is not a VTEP address as a status records it (a bare address, no prefix)."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if len(value) > 45 or "%" in value:
        # ipaddress takes any text after '%' as an IPv6 scope id: it would reach `ip` verbatim.
        return f"{value[:80]!r} is not an IPv4 or IPv6 address (no prefix, no scope id)"
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IPv4 or IPv6 address (no prefix, no scope id)"
    return None


def netns_path_problem(value: object) -> str | None:
    """Why `value` is not a pod network-namespace path meshnet accepts from a status."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not _NETNS_PATH.fullmatch(value):
        return (f"{value[:120]!r} is not /var/run/netns/NAME, /run/netns/NAME or /proc/PID/ns/net "
                f"(PID > 1)")
    return None


def container_id_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not _CONTAINER_ID.fullmatch(value):
        return (f"{value[:80]!r} is not a container id (letters, digits, '_', '.', '-', starting with "
                f"a letter or digit; at most 255)")
    return None


def _node_problem(value: object) -> str | None:
    return naming.k8s_name_problem(value)


_FIELD_CHECKS = {
    "src_ip": vtep_problem,
    "net_ns": netns_path_problem,
    "container_id": container_id_problem,
    "node": _node_problem,
    "plumbing_error": _text_problem,
}


@lru_cache(maxsize=16384)
def _status_intf_problem(intf: str) -> str | None:
    # Every list re-reads the same few thousand names: check each once.
    if intf in _NOT_OURS:
        # Garbage collection removes the names a status lists: never the pod network's or lo.
        return f"{intf!r} is never an interface meshnet made"
    return naming.ifname_problem(intf)


def _parse_link_status(raw: object, where: str, problems: list[str]) -> LinkStatus | None:
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping, not {type(raw).__name__}")
        return None
    before = len(problems)
    uid = raw.get("uid")
    why = _int_problem(uid, 0, naming.MAX_UID)
    if why:
        problems.append(f"{where}.uid: {why}")
    kind = raw.get("kind", "")
    if kind not in LINK_KINDS:
        problems.append(f"{where}.kind: {kind!r:.80} is not one of {', '.join(k for k in LINK_KINDS if k)} (or empty)")
    state = raw.get("state")
    if state not in LINK_STATES:
        problems.append(f"{where}.state: {state!r:.80} is not one of {', '.join(LINK_STATES)}")
    message = raw.get("message", "")
    why = _text_problem(message) if message != "" else None
    if why:
        problems.append(f"{where}.message: {why}")
    intf = raw.get("intf", "")
    why = (_status_intf_problem(intf) if type(intf) is str else naming.ifname_problem(intf)) if intf != "" else None
    if why:
        problems.append(f"{where}.intf: {why}")
    admin = raw.get("admin", "")
    if admin != "" and admin not in ADMIN_STATES:
        problems.append(f"{where}.admin: {admin!r:.80} is not one of {', '.join(ADMIN_STATES)} (or empty)")
    impairments = _parse_impairments(raw.get("impairments"), where, problems, ".")
    unavailable = raw.get("unavailable", [])
    netem_only = [f for f in IMPAIRMENT_FIELDS if f != "rate"]
    if not isinstance(unavailable, list) or any(u not in netem_only for u in unavailable) \
            or len(set(unavailable)) != len(unavailable):
        problems.append(f"{where}.unavailable: {unavailable!r:.120} is not a list of distinct impairment fields "
                        f"netem implements ({', '.join(netem_only)})")
    if len(problems) > before:
        return None
    return LinkStatus(uid, kind, state, message, intf, admin, impairments,  # type: ignore[arg-type]
                      tuple(unavailable))


def _parse_skip(raw: object, where: str, problems: list[str]) -> Skip | None:
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping, not {type(raw).__name__}")
        return None
    before = len(problems)
    why = naming.k8s_name_problem(raw.get("pod_name"))
    if why:
        problems.append(f"{where}.pod_name: {why}")
    why = _int_problem(raw.get("link_id"), 0, naming.MAX_UID)
    if why:
        problems.append(f"{where}.link_id: {why}")
    if len(problems) > before:
        return None
    return Skip(raw["pod_name"], raw["link_id"])


def _parse_list(raw: Mapping[str, Any], key: str, obj: str, problems: list[str],
                parse: Any) -> list[Any]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"{obj}: status.{key}: must be a list, not {type(value).__name__}")
        return []
    if len(value) > MAX_STATUS_ITEMS:
        problems.append(f"{obj}: status.{key}: has {len(value)} entries; at most {MAX_STATUS_ITEMS}")
        return []
    out = []
    for i, item in enumerate(value):
        parsed = parse(item, f"{obj}: status.{key}[{i}]", problems)
        if parsed is not None:
            out.append(parsed)
    return out


@dataclass(frozen=True)
class TopologyStatus:
    src_ip: str = ""  # VTEP (node) address of the pod's node
    net_ns: str = ""  # the runtime's netns path
    container_id: str = ""
    node: str = ""
    skipped: tuple[Skip, ...] = ()
    links: tuple[LinkStatus, ...] = ()
    plumbing_error: str = ""
    vni_block: int = 0  # the namespace's VNI block as this pod recorded it (naming.choose_vni_block)
    # Why the status read back was refused, one line per pod and field ("Topology ns/pod:
    # status.net_ns: ..."). Any problem makes the pod count as not alive; refused values are
    # dropped (empty), so nothing downstream can use them. Never written back.
    problems: tuple[str, ...] = ()

    @property
    def alive(self) -> bool:
        return bool(self.src_ip and self.net_ns) and not self.problems

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("src_ip", "net_ns", "container_id", "node"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.plumbing_error:
            out["plumbing_error"] = _bounded_text(self.plumbing_error)
        if self.skipped:
            out["skipped"] = [{"pod_name": s.pod_name, "link_id": s.link_id} for s in self.skipped]
        if self.links:
            out["links"] = [ls.to_api() for ls in self.links]
        if self.vni_block:
            out["vni_block"] = self.vni_block
        return out

    @classmethod
    def from_api(cls, raw: object, obj: str = "Topology") -> TopologyStatus:
        """Parse a status as read back from a store. Never raises: what is malformed is dropped
        and listed in `problems` (naming `obj`, e.g. "Topology ns/pod", and the field)."""
        if raw is None or raw == {}:
            return cls()
        problems: list[str] = []
        if not isinstance(raw, Mapping):
            return cls(problems=(f"{obj}: status: must be a mapping, not {type(raw).__name__}",))
        values: dict[str, Any] = {}
        for key in _STATUS_FIELDS:
            value = raw.get(key)
            if value is None or value == "":
                continue
            why = _FIELD_CHECKS[key](value)
            if why:
                problems.append(f"{obj}: status.{key}: {why}")
            else:
                # An address is kept in its canonical form, so comparisons with a caller's are exact.
                values[key] = str(ipaddress.ip_address(value)) if key == "src_ip" else value
        block = raw.get("vni_block")
        if block is not None:
            why = _int_problem(block, 0, naming.VNI_BLOCKS)
            if why:
                problems.append(f"{obj}: status.vni_block: {why}")
            else:
                values["vni_block"] = block
        links = _parse_list(raw, "links", obj, problems, _parse_link_status)
        skipped = _parse_list(raw, "skipped", obj, problems, _parse_skip)
        # Refused values are left out (empty); the valid rest is kept (a container id still
        # guards DEL ordering, link intfs still bound garbage collection), but `problems` makes
        # the pod not alive, so no plan is made from it.
        return cls(skipped=tuple(skipped), links=tuple(links), problems=tuple(problems), **values)


@dataclass(frozen=True)
class Topology:
    name: str
    namespace: str
    links: tuple[Link, ...]
    status: TopologyStatus = field(default_factory=TopologyStatus)
    resource_version: str = ""
    source: str = field(default="", compare=False)
    # metadata.generation: the API server counts spec changes in it (0: not known, e.g. SQLite).
    # A later copy of the object with the same generation has this spec (`parse_topology`'s `like`).
    generation: int = field(default=0, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def link(self, uid: int) -> Link | None:
        return self._by_uid.get(uid)

    @cached_property
    def _by_uid(self) -> dict[int, Link]:
        # Peer checks and planning look links up by uid once per link: keep that O(1).
        return {lnk.uid: lnk for lnk in self.links}

    def with_status(self, status: TopologyStatus) -> Topology:
        return replace(self, status=status)

    def to_api(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if self.resource_version:
            meta["resourceVersion"] = self.resource_version
        out: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": meta,
            "spec": {"links": [lnk.to_api() for lnk in self.links]},
        }
        status = self.status.to_api()
        if status:
            out["status"] = status
        return out

    @classmethod
    def from_api(cls, raw: Mapping[str, Any], source: str = "", like: Topology | None = None) -> Topology:
        """Parse and validate one Topology object (a YAML document or an API response); `like`: see
        `parse_topology`."""
        return parse_topology(raw, source, like)


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    node_name: str = ""
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class Manifest:
    topologies: tuple[Topology, ...]
    pods: tuple[Pod, ...]

    def topology(self, namespace: str, name: str) -> Topology | None:
        for t in self.topologies:
            if t.key == (namespace, name):
                return t
        return None


def _parse_ip(value: object, where: str, problems: list[str]) -> IPInterface | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: must be a CIDR string such as 12.12.12.1/24, not {value!r}")
        return None
    if "/" not in value:
        problems.append(f"{where}: {value!r} has no prefix length (write it as a CIDR, e.g. {value}/24)")
        return None
    if "%" in value:
        # ipaddress accepts any text as an IPv6 scope id ("fe80::1%x dev lo/64"); it would reach
        # the `ip -batch` line verbatim, so scoped addresses are refused outright.
        problems.append(f"{where}: {value!r} has a scope id ('%...'); link addresses take none")
        return None
    try:
        return shared_interface(value)
    except ValueError:
        problems.append(f"{where}: {value!r} is not an IPv4 or IPv6 address with prefix length")
        return None


# A link's two addresses are parsed twice, in each of its pods' Topologies (local_ip here is
# peer_ip there), and meshnetd caches every Topology of the cluster: the same text gives the same
# object while any Topology holds it (an IPv4Interface with its network is ~350 bytes; nobody
# changes one). Weak values: nothing is kept for Topologies gone. Parsing runs on several threads.
_INTERFACES: weakref.WeakValueDictionary[str, IPInterface] = weakref.WeakValueDictionary()
_INTERFACES_LOCK = threading.Lock()


def shared_interface(text: str) -> IPInterface:
    """`ipaddress.ip_interface(text)` (ValueError alike), the object any Topology holds for it."""
    with _INTERFACES_LOCK:
        found = _INTERFACES.get(text)
    if found is not None:
        return found
    parsed = ipaddress.ip_interface(text)
    with _INTERFACES_LOCK:
        return _INTERFACES.setdefault(text, parsed)


def _parse_link(raw: object, source: str, obj: str, index: int, problems: list[str]) -> Link | None:
    if not isinstance(raw, Mapping):
        problems.append(f"{_where(source, obj)}: spec.links[{index}]: must be a mapping, not {raw!r}")
        return None
    uid_raw = raw.get("uid")
    label = uid_raw if isinstance(uid_raw, int) and not isinstance(uid_raw, bool) else None
    here = f"{_where(source, obj)}: spec.links[{index}]" if label is None else _where(source, obj, label)
    before = len(problems)
    unknown = sorted(set(raw) - _LINK_FIELDS)
    if unknown:
        problems.append(f"{here}: unknown field(s) {', '.join(map(str, unknown))} "
                        f"(known: {', '.join(sorted(_LINK_FIELDS))})")
    for key in _REQUIRED_LINK_FIELDS:
        if key not in raw:
            problems.append(f"{here}: {key}: is required")
    if "uid" in raw and label is None:
        problems.append(f"{here}: uid: must be an integer, not {uid_raw!r}")
    elif label is not None and not 0 <= label <= naming.MAX_UID:
        problems.append(f"{here}: uid: {label} is outside 0..{naming.MAX_UID} "
                        f"(a namespace's links share one block of {naming.VNI_BLOCK_SIZE} VNIs)")
    peer_pod = raw.get("peer_pod")
    if "peer_pod" in raw and peer_pod != LOCALHOST:
        why = naming.k8s_name_problem(peer_pod)
        if why:
            problems.append(f"{here}: peer_pod: {why}")
    for key in ("local_intf", "peer_intf"):
        if key in raw:
            why = naming.ifname_problem(raw[key])
            if why:
                problems.append(f"{here}: {key}: {why}")
    if raw.get("local_intf") == naming.POD_NETWORK_IF:
        problems.append(f"{here}: local_intf: eth0 is reserved for the pod network")
    if raw.get("peer_intf") == naming.POD_NETWORK_IF and peer_pod != LOCALHOST:
        problems.append(f"{here}: peer_intf: eth0 is reserved for the pod network")
    local_ip = _parse_ip(raw.get("local_ip"), f"{here}: local_ip", problems)
    peer_ip = _parse_ip(raw.get("peer_ip"), f"{here}: peer_ip", problems)
    if local_ip is not None and peer_ip is not None and local_ip.version != peer_ip.version:
        problems.append(f"{here}: peer_ip: {peer_ip} is IPv{peer_ip.version} but local_ip is IPv{local_ip.version}")
    mtu = raw.get("mtu")
    if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535):
        problems.append(f"{here}: mtu: must be an integer in 68..65535, not {mtu!r}")
    state = raw.get("state", "up")
    if state not in ADMIN_STATES:
        problems.append(f"{here}: state: {state!r} is not one of {', '.join(ADMIN_STATES)}")
    impairments = _parse_impairments(raw.get("impairments"), here, problems)
    local_ips = _parse_ips(raw.get("local_ips"), f"{here}: local_ips", local_ip, problems)
    local_mac = _parse_mac(raw.get("local_mac"), f"{here}: local_mac", problems)
    if len(problems) > before or label is None:
        return None
    return Link(label, str(peer_pod), str(raw["local_intf"]), str(raw["peer_intf"]), local_ip, peer_ip, mtu,
                str(state), impairments, local_ips, local_mac)


def _metadata(raw: Mapping[str, Any], source: str, kind: str, problems: list[str]) -> tuple[str, str, str]:
    meta = raw.get("metadata")
    if not isinstance(meta, Mapping):
        problems.append(f"{source}: {kind}: metadata: is required")
        return "", "", ""
    name = meta.get("name")
    namespace = meta.get("namespace") or "default"
    obj = f"{kind} {namespace}/{name}"
    why = naming.k8s_name_problem(name)
    if why:
        problems.append(f"{_where(source, obj)}: metadata.name: {why}")
    why = naming.k8s_name_problem(namespace, label=True)
    if why:
        problems.append(f"{_where(source, obj)}: metadata.namespace: {why}")
    return str(name), str(namespace), str(meta.get("resourceVersion") or "")


def _generation(raw: Mapping[str, Any]) -> int:
    meta = raw.get("metadata")
    gen = meta.get("generation") if isinstance(meta, Mapping) else None
    return gen if type(gen) is int and gen > 0 else 0


def _same_spec(raw: Mapping[str, Any], like: Topology, source: str) -> Topology | None:
    """`like`'s spec with `raw`'s status, when `raw` is the same object at the same generation: the
    API server bumps metadata.generation on every spec change and never on a status write, and no
    client sets it. A status write is most of what a watch brings; its spec was parsed once
    already (over half of parsing an event, for each daemon). None: parse the whole object."""
    meta = raw.get("metadata")
    if not like.generation or not isinstance(meta, Mapping) or _generation(raw) != like.generation:
        return None
    if (meta.get("name"), meta.get("namespace") or "default") != (like.name, like.namespace) \
            or raw.get("apiVersion") not in (None, API_VERSION):
        return None
    status = TopologyStatus.from_api(raw.get("status"), f"{KIND} {like.namespace}/{like.name}")
    return Topology(like.name, like.namespace, like.links, status, str(meta.get("resourceVersion") or ""), source,
                    like.generation)


def parse_topology(raw: Mapping[str, Any], source: str = "", like: Topology | None = None) -> Topology:
    """One Topology object → `Topology`, or `ManifestError` listing every problem of it.

    `like`: an earlier copy of the same object; its parsed spec is taken when the generation says
    the spec is the same (`_same_spec`); the status is always parsed."""
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ManifestError([f"{source}: Topology: must be a mapping"])
    if like is not None and (same := _same_spec(raw, like, source)) is not None:
        return same
    name, namespace, rv = _metadata(raw, source, KIND, problems)
    obj = f"{KIND} {namespace}/{name}"
    api_version = raw.get("apiVersion")
    if api_version not in (None, API_VERSION):
        problems.append(f"{_where(source, obj)}: apiVersion: {api_version!r} is not {API_VERSION}")
    spec = raw.get("spec")
    links_raw = spec.get("links") if isinstance(spec, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(links_raw, list):
        problems.append(f"{_where(source, obj)}: spec.links: is required and must be a list")
        raise ManifestError(problems)
    links: list[Link] = []
    for i, lr in enumerate(links_raw):
        lnk = _parse_link(lr, source, obj, i, problems)
        if lnk is not None:
            links.append(lnk)
    seen_uid: set[int] = set()
    seen_if: dict[str, int] = {}
    seen_mac: dict[str, int] = {}
    for lnk in links:
        where = _where(source, obj, lnk.uid)
        if lnk.uid in seen_uid:
            problems.append(f"{where}: uid: used by more than one link of this pod")
        seen_uid.add(lnk.uid)
        if lnk.local_intf in seen_if:
            problems.append(f"{where}: local_intf: {lnk.local_intf} is already used by link uid "
                            f"{seen_if[lnk.local_intf]} of this pod")
        seen_if.setdefault(lnk.local_intf, lnk.uid)
        if lnk.local_mac is not None:
            if lnk.local_mac in seen_mac:
                problems.append(f"{where}: local_mac: {lnk.local_mac} is already used by link uid "
                                f"{seen_mac[lnk.local_mac]} of this pod")
            seen_mac.setdefault(lnk.local_mac, lnk.uid)
        if lnk.peer_pod == name:
            problems.append(f"{where}: peer_pod: a link from {name} to itself (self-loop) is not allowed")
    if problems:
        raise ManifestError(problems)
    status = TopologyStatus.from_api(raw.get("status"), obj)
    return Topology(name, namespace, tuple(links), status, rv, source, _generation(raw))


def check_peers(topologies: Iterable[Topology]) -> None:
    """Cross-object rules: symmetric links and namespace-unique uids. Raises ManifestError."""
    problems: list[str] = []
    by_key = {t.key: t for t in topologies}
    owners: dict[tuple[str, int], list[Topology]] = {}
    for t in by_key.values():
        for lnk in t.links:
            owners.setdefault((t.namespace, lnk.uid), []).append(t)
    for (ns, uid), ts in sorted(owners.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        names = sorted(t.name for t in ts)
        if len(ts) > 2:
            problems.append(f"{_where(ts[0].source, f'namespace {ns}', uid)}: uid: used by {len(ts)} "
                            f"pods ({', '.join(names)}); a uid names one link between two pods")
            continue
        if len(ts) == 2:
            a, b = ts
            la, lb = a.link(uid), b.link(uid)
            assert la is not None and lb is not None
            if la.peer_pod != b.name or lb.peer_pod != a.name:
                # Two links that do not point at each other (e.g. r1→r2 and r3→r4 whose peers have
                # no Topology, or a macvlan and a pod link): the same uid would give both one VNI.
                problems.append(f"{_where(ts[0].source, f'namespace {ns}', uid)}: uid: used by two different "
                                f"links ({a.name}→{la.peer_pod} and {b.name}→{lb.peer_pod}); "
                                f"a uid names one link between two pods")
                continue
        for t in ts:
            mine = t.link(uid)
            assert mine is not None
            lnk = mine
            if lnk.is_macvlan:
                continue
            peer = by_key.get((ns, lnk.peer_pod))
            if peer is None:
                continue  # a peer without a Topology is legal: the link simply never comes up
            theirs = peer.link(uid)
            where = _where(t.source, f"{KIND} {ns}/{t.name}", uid)
            if theirs is None:
                problems.append(f"{where}: peer_pod: {peer.name} has no link with uid {uid}")
                continue
            want = lnk.mirrored(t.name)
            for fld in ("peer_pod", "local_intf", "peer_intf", "local_ip", "peer_ip", "mtu"):
                if getattr(theirs, fld) != getattr(want, fld) and t.name < peer.name:
                    problems.append(f"{where}: {fld}: {peer.name} has {getattr(theirs, fld)!r} but this "
                                    f"link needs {getattr(want, fld)!r} there (links must be mirrored)")
    if problems:
        raise ManifestError(problems)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def yaml_documents(text: str) -> list[Any]:
    """Every YAML document of `text` (yaml.YAMLError if it is not YAML), read safely and with libyaml
    when present: the pure-Python loader takes seconds for a 1500-link topology or a 750-router one.
    yaml is imported here, not at the top: meshnetd and the CNI path never read YAML, and the
    import costs a restarted daemon ~10 ms and ~1.5 MiB."""
    import yaml

    return list(yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def _iter_documents(text: str, source: str) -> Iterator[Mapping[str, Any]]:
    import yaml

    try:
        docs = yaml_documents(text)
    except yaml.YAMLError as e:
        raise ManifestError([f"{source}: not valid YAML: {e}"]) from e
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise ManifestError([f"{source}: every YAML document must be a mapping, got {doc!r:.60}"])
        if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            yield from doc["items"]
        else:
            yield doc


def parse_manifest(text: str, source: str = "<manifest>") -> Manifest:
    """A Kubernetes YAML stream → Topologies and Pods (StatefulSets expand to their pods)."""
    problems: list[str] = []
    topologies: list[Topology] = []
    pods: list[Pod] = []
    for doc in _iter_documents(text, source):
        kind = doc.get("kind")
        try:
            if kind == KIND:
                topologies.append(parse_topology(doc, source))
            elif kind == "Pod":
                name, ns, _ = _metadata(doc, source, "Pod", problems)
                spec = _mapping(doc.get("spec"))
                pods.append(Pod(name, ns, str(spec.get("nodeName") or ""), source))
            elif kind == "StatefulSet":
                name, ns, _ = _metadata(doc, source, "StatefulSet", problems)
                spec = _mapping(doc.get("spec"))
                replicas = spec.get("replicas", 1)
                if not isinstance(replicas, int) or replicas < 0:
                    problems.append(f"{source}: StatefulSet {ns}/{name}: spec.replicas: {replicas!r}")
                    continue
                pods.extend(Pod(f"{name}-{i}", ns, "", source) for i in range(replicas))
        except ManifestError as e:
            problems.extend(e.problems)
    seen: set[tuple[str, str, str]] = set()
    for obj in [*((KIND, t.namespace, t.name) for t in topologies), *(("Pod", p.namespace, p.name) for p in pods)]:
        if obj in seen:
            problems.append(f"{source}: {obj[0]} {obj[1]}/{obj[2]}: metadata.name: defined twice")
        seen.add(obj)
    if problems:
        raise ManifestError(problems)
    check_peers(topologies)
    return Manifest(tuple(topologies), tuple(pods))


def load_manifest(path: str | Path) -> Manifest:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ManifestError([f"{p}: cannot read: {e.strerror}"]) from e
    return parse_manifest(text, str(p))
