"""CNI results (spec section 5) and their conversion between versions.

Separate from `spec` on purpose: dataclasses (and the `inspect` module it imports) cost ~25 ms
of start-up, which the shim — started once per pod, and which never looks inside a result —
must not pay. meshnetd and the delegate runner use this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshnet.cni.protocol import DECODING_FAILURE, INCOMPATIBLE_VERSION, SUPPORTED_VERSIONS, CniError, version_key

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
