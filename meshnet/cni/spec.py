"""The CNI specification as meshnet needs it: versions, error codes, env/config parsing, results.

Standard library only: the shim (compiled into a standalone binary, started once per pod) imports
this module, so every import here is paid on every CNI call. Keep it to ``json`` and ``dataclasses``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# typing costs ~5 ms of start-up on every pod and is only needed by type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]

# Well-known error codes (CNI spec, "Error" section).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
CONTAINER_UNKNOWN = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
# STATUS only (spec 1.1.0): the plugin cannot service ADD requests right now.
PLUGIN_NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
INTERNAL = 999
# meshnet's own codes (the spec leaves 100+ to plugins).
TOPOLOGY_INVALID = 100
LINK_PLUMBING_FAILED = 101
STORE_UNAVAILABLE = 102
PEER_UPDATE_FAILED = 103

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC")
ENV_VARS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")

# Which parameters each command must get (spec section 2, "CNI operations").
REQUIRED_ENV: Mapping[str, tuple[str, ...]] = {
    "ADD": ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": ("CNI_COMMAND",),
    "VERSION": ("CNI_COMMAND",),
    "GC": ("CNI_COMMAND", "CNI_PATH"),
}
# The first spec version that knows each command; older configs must not be given it.
MIN_VERSION: Mapping[str, str] = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}

DEFAULT_DAEMON_SOCKET = "/run/meshnet/meshnet.sock"
DEFAULT_DAEMON_TIMEOUT = 240.0
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"
# libcni also writes this older (mis-spelled in spec 1.1.0 drafts) key with the same value.
LEGACY_ATTACHMENTS_KEY = "cni.dev/attachments"

_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_IFNAME_FORBIDDEN = re.compile(r"[/:\s]")


class CniError(Exception):
    """A failure the runtime gets as the spec's error JSON; ``code`` is a spec code or one of ours."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(code, msg, details)
        self.code = code
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg

    @classmethod
    def from_dict(cls, error: Mapping[str, Any]) -> CniError:
        """Rebuild an error from its JSON form (a plugin's or meshnetd's answer)."""
        code = error.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            return cls(INTERNAL, "malformed CNI error", json.dumps(dict(error), sort_keys=True))
        return cls(code, str(error.get("msg", "")), str(error.get("details") or ""))


def error_to_dict(exc: BaseException, cni_version: str | None = None) -> dict[str, Any]:
    """The one place an exception becomes the spec's error JSON; non-CniErrors are code 999."""
    if not isinstance(exc, CniError):
        exc = CniError(INTERNAL, "internal error", f"{type(exc).__name__}: {exc}")
    version = cni_version if cni_version in SUPPORTED_VERSIONS else LATEST_VERSION
    answer: dict[str, Any] = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
    if exc.details:
        answer["details"] = exc.details
    return answer


def version_key(version: str) -> tuple[int, ...]:
    """``"0.4.0"`` -> ``(0, 4, 0)``; raises ValueError for anything that is not dotted numbers."""
    return tuple(int(part) for part in version.split("."))


def version_hint(stdin: str) -> str | None:
    """The config's cniVersion if it can be read at all: errors should answer in the caller's version."""
    try:
        value = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def version_answer(stdin: str) -> dict[str, Any]:
    """The VERSION reply. Its cniVersion echoes the caller's when we speak it (stdin may be empty)."""
    asked = version_hint(stdin) if stdin.strip() else None
    return {
        "cniVersion": asked if asked in SUPPORTED_VERSIONS else LATEST_VERSION,
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }


# ---------------------------------------------------------------------------------------------
# Environment and network configuration


def parse_cni_args(raw: str) -> dict[str, str]:
    """``"K8S_POD_NAME=r1;K8S_POD_NAMESPACE=lab;IgnoreUnknown=1"`` -> dict (error 4 when malformed)."""
    args: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, "invalid CNI_ARGS", f"pair {pair!r} is not KEY=VALUE")
        args[key] = value
    return args


def _check_env(env: Mapping[str, str], command: str) -> None:
    for var in REQUIRED_ENV[command]:
        if not env.get(var):
            raise CniError(INVALID_ENV, f"required env variable {var} is missing", f"CNI_COMMAND={command}")
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID.fullmatch(container_id):
        raise CniError(
            INVALID_ENV,
            "invalid CNI_CONTAINERID",
            f"{container_id!r}: must start alphanumeric, then only alphanumerics, '_', '.', '-'",
        )
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (len(ifname) > 15 or ifname in (".", "..") or _IFNAME_FORBIDDEN.search(ifname)):
        raise CniError(
            INVALID_ENV,
            "invalid CNI_IFNAME",
            f"{ifname!r}: at most 15 characters, not '.' or '..', no '/', ':' or whitespace",
        )


@dataclass(frozen=True)
class Attachment:
    """One entry of GC's ``cni.dev/valid-attachments``."""

    container_id: str
    ifname: str


@dataclass(frozen=True)
class NetConf:
    """The fields of the network config meshnet uses; ``raw`` keeps the whole config as received."""

    cni_version: str
    name: str
    type: str
    delegate: dict[str, Any] | None = None
    prev_result: dict[str, Any] | None = None
    daemon_socket: str = DEFAULT_DAEMON_SOCKET
    daemon_timeout: float = DEFAULT_DAEMON_TIMEOUT
    log_file: str | None = None
    valid_attachments: tuple[Attachment, ...] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _optional(conf: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = conf.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise CniError(
            INVALID_NETWORK_CONFIG,
            f"invalid network config: {key!r} must be {what}",
            f"got {type(value).__name__}",
        )
    return value


def _parse_attachments(conf: Mapping[str, Any]) -> tuple[Attachment, ...] | None:
    key = VALID_ATTACHMENTS_KEY if VALID_ATTACHMENTS_KEY in conf else LEGACY_ATTACHMENTS_KEY
    if key not in conf:
        return None
    entries = conf[key]
    if entries is None:  # Go marshals an empty attachment set as null
        return ()
    if not isinstance(entries, list):
        raise CniError(INVALID_NETWORK_CONFIG, f"invalid network config: {key!r} must be a list")
    attachments = []
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("containerID"), str)
            and isinstance(entry.get("ifname"), str)
        ):
            raise CniError(
                INVALID_NETWORK_CONFIG,
                f"invalid network config: entry of {key!r}",
                f"{entry!r} needs string containerID and ifname",
            )
        attachments.append(Attachment(entry["containerID"], entry["ifname"]))
    return tuple(attachments)


def parse_netconf(stdin: str | bytes) -> NetConf:
    """Decode and validate a network config (error 6 undecodable, 7 invalid, 1 unsupported version)."""
    try:
        conf = json.loads(stdin)
    except ValueError as exc:
        raise CniError(DECODING_FAILURE, "failed to decode network config", str(exc)) from exc
    if not isinstance(conf, dict):
        raise CniError(DECODING_FAILURE, "failed to decode network config", "not a JSON object")
    for key in ("cniVersion", "name", "type"):
        if not isinstance(conf.get(key), str) or not conf[key]:
            raise CniError(
                INVALID_NETWORK_CONFIG,
                f"invalid network config: {key!r} is missing",
                f"{key!r} must be a non-empty string",
            )
    if conf["cniVersion"] not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {conf['cniVersion']!r}, plugin supports {list(SUPPORTED_VERSIONS)}",
        )
    timeout = _optional(conf, "daemon_timeout", (int, float), "a number of seconds")
    if timeout is not None and timeout <= 0:
        raise CniError(INVALID_NETWORK_CONFIG, "invalid network config: 'daemon_timeout' must be positive")
    return NetConf(
        cni_version=conf["cniVersion"],
        name=conf["name"],
        type=conf["type"],
        delegate=_optional(conf, "delegate", dict, "an object"),
        prev_result=_optional(conf, "prevResult", dict, "an object"),
        daemon_socket=_optional(conf, "daemon_socket", str, "a path") or DEFAULT_DAEMON_SOCKET,
        daemon_timeout=float(timeout) if timeout is not None else DEFAULT_DAEMON_TIMEOUT,
        log_file=_optional(conf, "log_file", str, "a path") or None,
        valid_attachments=_parse_attachments(conf),
        raw=conf,
    )


@dataclass(frozen=True)
class CniRequest:
    """One validated CNI call (every command but VERSION, which carries no request)."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: tuple[str, ...]
    conf: NetConf

    @property
    def pod_name(self) -> str | None:
        return self.args.get("K8S_POD_NAME")

    @property
    def pod_namespace(self) -> str | None:
        return self.args.get("K8S_POD_NAMESPACE")


def parse_command(env: Mapping[str, str]) -> str:
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "required env variable CNI_COMMAND is missing")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND: {command}", f"known: {', '.join(COMMANDS)}")
    return command


def parse_request(env: Mapping[str, str], stdin: str | bytes) -> CniRequest:
    """Validate the env for its command and the config; errors as the spec numbers them."""
    command = parse_command(env)
    if command == "VERSION":
        raise CniError(INVALID_ENV, "VERSION carries no request", "answer it with version_answer()")
    _check_env(env, command)
    conf = parse_netconf(stdin)
    needed = MIN_VERSION.get(command)
    if needed and version_key(conf.cni_version) < version_key(needed):
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"config version does not allow {command}",
            f"config is {conf.cni_version}, {command} needs {needed} or newer",
        )
    if command == "GC" and conf.valid_attachments is None:
        # Refusing is the safe side: GC without the list would make every attachment look stale.
        raise CniError(INVALID_NETWORK_CONFIG, f"invalid network config: GC needs {VALID_ATTACHMENTS_KEY!r}")
    path = tuple(p for p in env.get("CNI_PATH", "").split(":") if p)
    return CniRequest(
        command=command,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=parse_cni_args(env.get("CNI_ARGS", "")),
        path=path,
        conf=conf,
    )


# ---------------------------------------------------------------------------------------------
# Results (spec section 5) and their conversion between versions

# Fields that appeared in 1.1.0; older results must not carry them.
_INTERFACE_FIELDS_1_1 = ("mtu", "socketPath", "pciID")
_ROUTE_FIELDS_1_1 = ("mtu", "advmss", "priority", "table", "scope")


def _malformed(what: str, value: object) -> CniError:
    return CniError(DECODING_FAILURE, f"malformed CNI result: {what}", repr(value)[:200])


def _str_or_none(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise _malformed(what, value)


def _int_or_none(value: object, what: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise _malformed(what, value)


def _str_list(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _malformed(what, value)


def _objects(value: object, what: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    raise _malformed(what, value)


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str | None = None
    sandbox: str | None = None
    mtu: int | None = None
    socket_path: str | None = None
    pci_id: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Interface:
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise _malformed("interface without a name", d)
        return cls(
            name,
            _str_or_none(d.get("mac"), "interface mac"),
            _str_or_none(d.get("sandbox"), "interface sandbox"),
            _int_or_none(d.get("mtu"), "interface mtu"),
            _str_or_none(d.get("socketPath"), "interface socketPath"),
            _str_or_none(d.get("pciID"), "interface pciID"),
        )

    def to_dict(self, version: str) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "mac": self.mac, "sandbox": self.sandbox}
        if version_key(version) >= (1, 1, 0):
            d.update(mtu=self.mtu, socketPath=self.socket_path, pciID=self.pci_id)
        return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class IPConfig:
    address: str
    gateway: str | None = None
    interface: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IPConfig:
        address = d.get("address")
        if not isinstance(address, str) or "/" not in address:
            raise _malformed("ip address must be CIDR", d)
        return cls(
            address,
            _str_or_none(d.get("gateway"), "ip gateway"),
            _int_or_none(d.get("interface"), "ip interface"),
        )

    def to_dict(self, version: str) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if version_key(version) < (1, 0, 0):
            # 0.3.x/0.4.0 name the family; 1.0.0 dropped it as redundant with the address.
            d["version"] = "6" if ":" in self.address else "4"
        if self.interface is not None:
            d["interface"] = self.interface
        d["address"] = self.address
        if self.gateway is not None:
            d["gateway"] = self.gateway
        return d


@dataclass(frozen=True)
class Route:
    dst: str
    gw: str | None = None
    mtu: int | None = None
    advmss: int | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Route:
        dst = d.get("dst")
        if not isinstance(dst, str) or not dst:
            raise _malformed("route without dst", d)
        ints = {k: _int_or_none(d.get(k), f"route {k}") for k in _ROUTE_FIELDS_1_1}
        return cls(dst, _str_or_none(d.get("gw"), "route gw"), **ints)

    def to_dict(self, version: str) -> dict[str, Any]:
        d: dict[str, Any] = {"dst": self.dst, "gw": self.gw}
        if version_key(version) >= (1, 1, 0):
            d.update(mtu=self.mtu, advmss=self.advmss, priority=self.priority, table=self.table, scope=self.scope)
        return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str | None = None
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: object) -> DNS:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise _malformed("dns must be an object", d)
        return cls(
            _str_list(d.get("nameservers"), "dns nameservers"),
            _str_or_none(d.get("domain"), "dns domain"),
            _str_list(d.get("search"), "dns search"),
            _str_list(d.get("options"), "dns options"),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.nameservers:
            d["nameservers"] = list(self.nameservers)
        if self.domain:
            d["domain"] = self.domain
        if self.search:
            d["search"] = list(self.search)
        if self.options:
            d["options"] = list(self.options)
        return d


@dataclass(frozen=True)
class Result:
    """A plugin's ADD result, version-neutral; ``to_dict`` writes it in any supported version."""

    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = DNS()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Result:
        if not isinstance(d, Mapping):
            raise _malformed("result must be an object", d)
        if "ip4" in d or "ip6" in d:
            return cls._from_legacy(d)
        return cls(
            tuple(Interface.from_dict(i) for i in _objects(d.get("interfaces"), "interfaces")),
            tuple(IPConfig.from_dict(i) for i in _objects(d.get("ips"), "ips")),
            tuple(Route.from_dict(r) for r in _objects(d.get("routes"), "routes")),
            DNS.from_dict(d.get("dns")),
        )

    @classmethod
    def _from_legacy(cls, d: Mapping[str, Any]) -> Result:
        # 0.1.0/0.2.0 results (a delegate may still be configured that old): ip4/ip6 blocks, no interfaces.
        ips: list[IPConfig] = []
        routes: list[Route] = []
        for key in ("ip4", "ip6"):
            block = d.get(key)
            if block is None:
                continue
            if not isinstance(block, dict) or not isinstance(block.get("ip"), str):
                raise _malformed(f"{key} needs an ip", block)
            ips.append(IPConfig(block["ip"], _str_or_none(block.get("gateway"), f"{key} gateway")))
            routes.extend(Route.from_dict(r) for r in _objects(block.get("routes"), f"{key} routes"))
        return cls((), tuple(ips), tuple(routes), DNS.from_dict(d.get("dns")))

    def to_dict(self, version: str) -> dict[str, Any]:
        if version not in SUPPORTED_VERSIONS:
            raise CniError(INCOMPATIBLE_VERSION, "cannot convert result", f"to unsupported version {version!r}")
        d: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            d["interfaces"] = [i.to_dict(version) for i in self.interfaces]
        if self.ips:
            d["ips"] = [ip.to_dict(version) for ip in self.ips]
        if self.routes:
            d["routes"] = [r.to_dict(version) for r in self.routes]
        d["dns"] = self.dns.to_dict()
        return d


def convert_result(result: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """Rewrite a result dict (any version from 0.1.0 on) in ``to_version``."""
    return Result.from_dict(result).to_dict(to_version)
