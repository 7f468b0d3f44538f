"""Run a delegate network config (the master plugin that gives the pod eth0) the way libcni does.

The delegate is either one plugin config (``{"type": ...}``) or a whole conflist
(``{"plugins": [...]}``); a conflist is always run whole and in order, never just its first plugin
(the original meshnet ran only ``plugins[0]`` and so dropped e.g. kindnet's portmap).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from meshnet import watchdog
from meshnet.cni import protocol, results

DEFAULT_TIMEOUT = 120.0


def find_plugin(plugin_type: str, cni_path: Sequence[str]) -> str:
    """The first executable named ``plugin_type`` in the CNI_PATH directories."""
    if not plugin_type or "/" in plugin_type or plugin_type in (".", ".."):
        raise protocol.CniError(protocol.INVALID_NETWORK_CONFIG, "invalid delegate plugin type", repr(plugin_type))
    for directory in cni_path:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise protocol.CniError(
        protocol.INTERNAL,
        f"failed to find plugin {plugin_type!r}",
        f"searched CNI_PATH={':'.join(cni_path) or '(empty)'}",
    )


def _plugin_list(delegate: Mapping[str, Any], cni_version: str, name: str) -> tuple[str, str, list[dict[str, Any]]]:
    """(version, network name, plugin configs) of a delegate; the list's own values win over ours."""
    if not isinstance(delegate, Mapping):
        raise protocol.CniError(protocol.INVALID_NETWORK_CONFIG, "invalid delegate", "must be an object")
    version = delegate.get("cniVersion") or cni_version
    net_name = delegate.get("name") or name
    if not isinstance(version, str) or not isinstance(net_name, str):
        raise protocol.CniError(
            protocol.INVALID_NETWORK_CONFIG, "invalid delegate", "cniVersion and name must be strings"
        )
    plugins = delegate.get("plugins", [delegate])
    if not isinstance(plugins, list) or not plugins:
        raise protocol.CniError(
            protocol.INVALID_NETWORK_CONFIG, "invalid delegate", "'plugins' must be a non-empty list"
        )
    for plugin in plugins:
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
            raise protocol.CniError(
                protocol.INVALID_NETWORK_CONFIG, "invalid delegate plugin", f"{plugin!r} needs a 'type'"
            )
    try:
        protocol.version_key(version)
    except ValueError as exc:
        raise protocol.CniError(protocol.INVALID_NETWORK_CONFIG, "invalid delegate cniVersion", repr(version)) from exc
    return version, net_name, plugins


def _invoke(
    plugin: Mapping[str, Any],
    stdin_conf: Mapping[str, Any],
    command: str,
    env: Mapping[str, str],
    timeout: float,
) -> dict[str, Any] | None:
    plugin_type = plugin["type"]
    cni_path = [p for p in env.get("CNI_PATH", "").split(":") if p]
    binary = find_plugin(plugin_type, cni_path)
    # libcni passes the runtime's whole environment with the CNI_* variables set on top.
    child_env = {**os.environ, **env, "CNI_COMMAND": command}
    try:
        # Not subprocess.run(timeout=...): it polls for the exit with sleeps (meshnet.watchdog).
        proc = watchdog.run([binary], input=json.dumps(stdin_conf).encode(), env=child_env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise protocol.CniError(
            protocol.INTERNAL, f"delegate plugin {plugin_type} timed out", f"{command} after {timeout:g} s"
        ) from exc
    except OSError as exc:
        raise protocol.CniError(protocol.INTERNAL, f"delegate plugin {plugin_type} could not run", str(exc)) from exc
    output = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        try:
            answer = json.loads(output)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and "code" in answer:
            error = protocol.CniError.from_dict(answer)
            details = f"delegate plugin {plugin_type}" + (f": {error.details}" if error.details else "")
            raise protocol.CniError(error.code, error.msg, details)
        stderr = proc.stderr.decode(errors="replace").strip()
        raise protocol.CniError(
            protocol.INTERNAL,
            f"delegate plugin {plugin_type} failed with exit code {proc.returncode}",
            (output or stderr)[-500:],
        )
    if not output:
        return None
    try:
        result = json.loads(output)
    except ValueError as exc:
        raise protocol.CniError(
            protocol.DECODING_FAILURE, f"delegate plugin {plugin_type} printed no JSON", output[:200]
        ) from exc
    if not isinstance(result, dict):
        raise protocol.CniError(
            protocol.DECODING_FAILURE, f"delegate plugin {plugin_type} printed no JSON object", output[:200]
        )
    return result


def run_delegate(
    delegate: dict[str, Any],
    command: str,
    env: Mapping[str, str],
    cni_version: str,
    name: str,
    prev_result: dict[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    valid_attachments: Sequence[protocol.Attachment] = (),
    runtime_config: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Run ``command`` on the delegate; for ADD return its final result converted to ``cni_version``.

    ``cni_version``/``name`` are meshnet's own and only fill in what the delegate does not set.
    ``prev_result`` is the cached ADD result for DEL and CHECK (in ``cni_version``); it is converted
    to the delegate's version before the plugins see it. ``valid_attachments`` is only used by GC.
    """
    version, net_name, plugins = _plugin_list(delegate, cni_version, name)
    vkey = protocol.version_key(version)
    cached = results.convert_result(prev_result, version) if prev_result is not None else None

    def stdin_for(plugin: Mapping[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
        conf: dict[str, Any] = {**plugin, "name": net_name, "cniVersion": version}
        conf.pop("prevResult", None)
        if prev is not None:
            conf["prevResult"] = prev
        # As libcni: a plugin gets the runtime's runtimeConfig keys its capabilities ask for (portMappings
        # for portmap, bandwidth, ...), which the runtime handed to meshnet as the network's plugin.
        caps = plugin.get("capabilities")
        if runtime_config and isinstance(caps, Mapping):
            wanted = {k: v for k, v in runtime_config.items() if caps.get(k) is True}
            if wanted:
                conf["runtimeConfig"] = wanted
        return conf

    if command == "ADD":
        result: dict[str, Any] | None = None
        for plugin in plugins:
            result = _invoke(plugin, stdin_for(plugin, result), command, env, timeout)
        if result is None:
            raise protocol.CniError(protocol.INTERNAL, "delegate returned no result on ADD", f"network {net_name}")
        return results.convert_result(result, cni_version)
    if command == "DEL":
        # prevResult on DEL arrived with 0.4.0; older plugins must not be handed one.
        prev = cached if vkey >= (0, 4, 0) else None
        for plugin in reversed(plugins):
            _invoke(plugin, stdin_for(plugin, prev), command, env, timeout)
        return None
    if command == "CHECK":
        if delegate.get("disableCheck") is True:
            return None
        if vkey < (0, 4, 0):
            raise protocol.CniError(
                protocol.INCOMPATIBLE_VERSION, "delegate config version does not allow CHECK", f"it is {version}"
            )
        if cached is None:
            raise protocol.CniError(
                protocol.INVALID_NETWORK_CONFIG, "CHECK needs the cached ADD result", "no prevResult"
            )
        for plugin in plugins:
            _invoke(plugin, stdin_for(plugin, cached), command, env, timeout)
        return None
    if command in ("STATUS", "GC"):
        # Plugins older than 1.1.0 know neither verb; libcni then treats them as ready / nothing to do.
        if vkey < (1, 1, 0) or (command == "GC" and delegate.get("disableGC") is True):
            return None
        extra: dict[str, Any] = {}
        if command == "GC":
            listed = [{"containerID": a.container_id, "ifname": a.ifname} for a in valid_attachments]
            extra = {protocol.VALID_ATTACHMENTS_KEY: listed, protocol.LEGACY_ATTACHMENTS_KEY: listed}
        for plugin in plugins:
            _invoke(plugin, {**stdin_for(plugin, None), **extra}, command, env, timeout)
        return None
    raise protocol.CniError(protocol.INVALID_ENV, f"cannot delegate CNI_COMMAND {command}")


def chained_prev_result(conf: protocol.NetConf, command: str = "ADD") -> dict[str, Any] | None:
    """meshnet as the last plugin of a conflist: eth0 is what the plugins before it returned.

    ADD without a prevResult means meshnet was configured as a chained plugin but placed first.
    """
    if conf.prev_result is None:
        if command == "ADD":
            raise protocol.CniError(
                protocol.INVALID_NETWORK_CONFIG,
                "meshnet has no prevResult",
                "as a chained plugin it must come after the plugin that creates eth0, or set 'delegate'",
            )
        return None
    return results.convert_result(conf.prev_result, conf.cni_version)


def delegate_part(prev_result: Mapping[str, Any] | None, namespace: str, pod: str) -> dict[str, Any] | None:
    """The delegate's own part of the result the runtime keeps for meshnet (its DEL/CHECK prevResult).

    meshnet appends its links to the delegate's result; the delegate must not see them (bridge's
    CHECK would look for their addresses on eth0). meshnet's interfaces are known by the stable MAC
    it gives each (naming.mac_address), so this needs no daemon and no cache that a restart loses.
    """
    if not isinstance(prev_result, Mapping):
        return None
    from meshnet import naming  # hashlib and re: only DEL/CHECK with a prevResult pay for them

    interfaces = prev_result.get("interfaces")
    if not pod or not isinstance(interfaces, list):
        return dict(prev_result)

    def ours(iface: object) -> bool:
        if not isinstance(iface, Mapping) or not iface.get("sandbox") or not isinstance(iface.get("name"), str):
            return False
        mac = iface.get("mac")
        return isinstance(mac, str) and mac.lower() == naming.mac_address(namespace, pod, iface["name"])

    keep = [i for i, iface in enumerate(interfaces) if not ours(iface)]
    if len(keep) == len(interfaces):
        return dict(prev_result)
    new_index = {old: new for new, old in enumerate(keep)}
    out = dict(prev_result)
    out["interfaces"] = [interfaces[i] for i in keep]
    ips = prev_result.get("ips")
    if isinstance(ips, list):
        kept_ips = []
        for ip in ips:
            at = ip.get("interface") if isinstance(ip, Mapping) else None
            if isinstance(at, int) and not isinstance(at, bool):
                if at not in new_index:
                    continue  # an address of one of meshnet's links
                ip = {**ip, "interface": new_index[at]}
            kept_ips.append(ip)
        out["ips"] = kept_ips
    return out
