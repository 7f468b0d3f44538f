"""The CNI specification as meshnet needs it: versions, error codes, env and config parsing.

Standard library only: the shim (compiled into a standalone binary, started once per pod) imports
this module, so every import here is paid on every CNI call. Keep it to ``json`` (no dataclasses:
they import ``inspect``); results live in ``meshnet.cni.results``, which only meshnetd needs.
"""

from __future__ import annotations

from meshnet.cni import wirejson as json  # `json`'s API without its ~15 ms of imports

# typing costs ~5 ms of start-up on every pod and is only needed by type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
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
# Where runtimes look for network configs and plugin binaries unless configured otherwise.
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_DAEMON_TIMEOUT = 240.0
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"
# libcni also writes this older (mis-spelled in spec 1.1.0 drafts) key with the same value.
LEGACY_ATTACHMENTS_KEY = "cni.dev/attachments"

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_CHARS = _ALNUM | frozenset("_.-")


def _valid_container_id(value: str) -> bool:
    # The spec's rule, ^[A-Za-z0-9][A-Za-z0-9_.-]*$, without `re` (an import the shim avoids).
    return bool(value) and value[0] in _ALNUM and all(c in _ID_CHARS for c in value)


def _bad_ifname_char(value: str) -> bool:
    return any(c in "/:" or c.isspace() for c in value)


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
            return cls(INTERNAL, "malformed CNI error", json.dumps(dict(sorted(error.items()))))
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
    if container_id and not _valid_container_id(container_id):
        raise CniError(
            INVALID_ENV,
            "invalid CNI_CONTAINERID",
            f"{container_id!r}: must start alphanumeric, then only alphanumerics, '_', '.', '-'",
        )
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (len(ifname) > 15 or ifname in (".", "..") or _bad_ifname_char(ifname)):
        raise CniError(
            INVALID_ENV,
            "invalid CNI_IFNAME",
            f"{ifname!r}: at most 15 characters, not '.' or '..', no '/', ':' or whitespace",
        )


class _Record:
    """A plain record: fields in __slots__, compared and shown by value.

    Not a dataclass on purpose: `dataclasses` imports `inspect`, ~25 ms on every pod start.
    """

    __slots__: tuple[str, ...] = ()
    _compare: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in (self._compare or self.__slots__))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Record) and type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in (self._compare or self.__slots__))
        return f"{type(self).__name__}({shown})"


class Attachment(_Record):
    """One entry of GC's ``cni.dev/valid-attachments``."""

    __slots__ = ("container_id", "ifname")

    def __init__(self, container_id: str, ifname: str) -> None:
        self.container_id = container_id
        self.ifname = ifname


class NetConf(_Record):
    """The fields of the network config meshnet uses; ``raw`` keeps the whole config as received."""

    __slots__ = ("cni_version", "name", "type", "delegate", "prev_result", "daemon_socket",  # noqa: RUF023
                 "daemon_timeout", "log_file", "valid_attachments", "raw")
    _compare = __slots__[:-1]  # raw holds the same config again: not compared

    def __init__(self, cni_version: str, name: str, type: str, delegate: dict[str, Any] | None = None,
                 prev_result: dict[str, Any] | None = None, daemon_socket: str = DEFAULT_DAEMON_SOCKET,
                 daemon_timeout: float = DEFAULT_DAEMON_TIMEOUT, log_file: str | None = None,
                 valid_attachments: tuple[Attachment, ...] | None = None, raw: dict[str, Any] | None = None) -> None:
        self.cni_version = cni_version
        self.name = name
        self.type = type
        self.delegate = delegate
        self.prev_result = prev_result
        self.daemon_socket = daemon_socket
        self.daemon_timeout = daemon_timeout
        self.log_file = log_file
        self.valid_attachments = valid_attachments
        self.raw: dict[str, Any] = raw if raw is not None else {}


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


class CniRequest(_Record):
    """One validated CNI call (every command but VERSION, which carries no request)."""

    __slots__ = ("args", "command", "conf", "container_id", "ifname", "netns", "path")

    def __init__(self, command: str, container_id: str, netns: str, ifname: str, args: dict[str, str],
                 path: tuple[str, ...], conf: NetConf) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args
        self.path = path
        self.conf = conf

    def replace(self, *, container_id: str | None = None, netns: str | None = None) -> CniRequest:
        """The same call for another sandbox (GC acts on the sandboxes the runtime forgot)."""
        return CniRequest(self.command, self.container_id if container_id is None else container_id,
                          self.netns if netns is None else netns, self.ifname, self.args, self.path, self.conf)

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
