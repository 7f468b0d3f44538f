"""`meshnetctl topo create|destroy`: put a topology manifest on a cluster, or take it off again.

Topologies go first (a pod's CNI ADD looks its Topology up; a pod created before it would come up
without links), then the pods, each with an init container running `meshnetctl init-wait N`
(N = the pod's links + 1 for eth0) so its main container starts with every interface present.
`create` waits until every pod is Running; `destroy` deletes the pods, waits until they are gone
(their CNI DEL still reads the Topologies), then deletes the Topologies and waits for those too.
Progress goes to stderr. `kubernetes` (~0.5 s to import) is imported only when a command runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshnet.model import GROUP, KIND, PLURAL, VERSION, ManifestError, parse_manifest, yaml_documents

DEFAULT_INIT_IMAGE = "meshnet/meshnet:latest"  # the DaemonSet's image: it carries meshnetctl
INIT_CONTAINER = "meshnet-init-wait"
REQUEST_TIMEOUT = 10.0

Progress = Callable[[str], None]


class TopoKubeError(Exception):
    """What went wrong, named by object; the CLI prints it and exits 1."""


@dataclass(frozen=True)
class Objects:
    topologies: list[dict[str, Any]]
    pods: list[dict[str, Any]]


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return str(obj["metadata"]["namespace"]), str(obj["metadata"]["name"])


def prepare(text: str, source: str, *, namespace: str | None = None,
            init_image: str = DEFAULT_INIT_IMAGE) -> Objects:
    """Validate a manifest and return the API bodies to create (namespaces set, init containers added)."""
    manifest = parse_manifest(text, source)
    topologies: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []
    for doc in yaml_documents(text):
        if doc is None:
            continue
        kind = doc.get("kind")
        if kind not in (KIND, "Pod"):
            raise TopoKubeError(f"{source}: {kind} {doc.get('metadata', {}).get('name')}: only Pod and Topology "
                                "documents can be created by `topo create` (apply others with kubectl)")
        body = copy.deepcopy(doc)
        meta = body.setdefault("metadata", {})
        meta["namespace"] = namespace or meta.get("namespace") or "default"
        for key in ("resourceVersion", "uid", "creationTimestamp"):
            meta.pop(key, None)
        body.pop("status", None)
        (topologies if kind == KIND else pods).append(body)
    links = {(t.namespace if namespace is None else namespace, t.name): len(t.links) for t in manifest.topologies}
    for pod in pods:
        interfaces = links.get(_key(pod), 0) + 1  # eth0 from the cluster's network, then the links
        spec = pod.setdefault("spec", {})
        others = [c for c in spec.get("initContainers") or [] if c.get("name") != INIT_CONTAINER]
        spec["initContainers"] = [{
            "name": INIT_CONTAINER,
            "image": init_image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["meshnetctl", "init-wait", str(interfaces)],
        }, *others]
    return Objects(topologies, pods)


def load(path: str | Path, *, namespace: str | None = None, init_image: str = DEFAULT_INIT_IMAGE) -> Objects:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ManifestError([f"{p}: cannot read: {e.strerror}"]) from e
    return prepare(text, str(p), namespace=namespace, init_image=init_image)


def api_client(kubeconfig: str | None = None) -> Any:
    """An ApiClient from `kubeconfig` (or $KUBECONFIG / ~/.kube/config), in a pod from its service account."""
    import kubernetes

    config = kubernetes.client.Configuration()
    try:
        if kubeconfig or not Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists():
            kubernetes.config.load_kube_config(config_file=kubeconfig or None, client_configuration=config)
        else:
            kubernetes.config.load_incluster_config(client_configuration=config)
    except (kubernetes.config.ConfigException, OSError) as e:
        raise TopoKubeError(f"cannot load a kubeconfig{f' from {kubeconfig}' if kubeconfig else ''}: {e}") from e
    return kubernetes.client.ApiClient(config)


def _api_error(e: Exception, what: str) -> TopoKubeError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(e, ApiException):
        message = e.reason or ""
        with contextlib.suppress(ValueError, AttributeError):  # a body that is not a Status object
            message = json.loads(e.body or "{}").get("message") or message
        return TopoKubeError(f"{what}: API server answered {e.status}: {message}")
    return TopoKubeError(f"{what}: cannot reach the API server: {e}")


class _Cluster:
    """The few API calls create/destroy need, each with a request timeout and errors named by object."""

    def __init__(self, client: Any) -> None:
        import kubernetes
        import urllib3

        # Typed Any: the generated client types make every field Optional; we read a few known ones.
        self.core: Any = kubernetes.client.CoreV1Api(client)
        self.custom: Any = kubernetes.client.CustomObjectsApi(client)
        self.api_exception = kubernetes.client.exceptions.ApiException
        self.errors: tuple[type[Exception], ...] = (self.api_exception, urllib3.exceptions.HTTPError, OSError)

    def _status(self, e: Exception) -> int:
        return int(getattr(e, "status", 0) or 0) if isinstance(e, self.api_exception) else 0

    def create_topology(self, body: dict[str, Any]) -> str:
        ns, name = _key(body)
        what = f"create Topology {ns}/{name}"
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body,
                                                        _request_timeout=REQUEST_TIMEOUT)
            return "created"
        except self.errors as e:
            if self._status(e) != 409:
                raise _api_error(e, what) from e
        try:  # it exists (a create run again): make its spec ours
            current = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                               _request_timeout=REQUEST_TIMEOUT)
            if current.get("spec") == body.get("spec"):
                return "unchanged"
            current["spec"] = body.get("spec")
            self.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, current,
                                                         _request_timeout=REQUEST_TIMEOUT)
            return "updated"
        except self.errors as e:
            raise _api_error(e, f"update Topology {ns}/{name}") from e

    def create_pod(self, body: dict[str, Any]) -> str:
        ns, name = _key(body)
        try:
            self.core.create_namespaced_pod(ns, body, _request_timeout=REQUEST_TIMEOUT)
            return "created"
        except self.errors as e:
            if self._status(e) == 409:
                return "exists"
            raise _api_error(e, f"create Pod {ns}/{name}") from e

    def pod_phases(self, namespaces: set[str]) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        for ns in sorted(namespaces):
            try:
                items = self.core.list_namespaced_pod(ns, _request_timeout=REQUEST_TIMEOUT).items
            except self.errors as e:
                raise _api_error(e, f"list pods in {ns}") from e
            for pod in items:
                phase = (pod.status.phase if pod.status else None) or "Pending"
                out[(ns, pod.metadata.name)] = "Terminating" if pod.metadata.deletion_timestamp else phase
        return out

    def topology_names(self, namespaces: set[str]) -> set[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        for ns in sorted(namespaces):
            try:
                listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                                                   _request_timeout=REQUEST_TIMEOUT)
            except self.errors as e:
                if self._status(e) == 404:  # no CRD (yet): no Topologies either
                    continue
                raise _api_error(e, f"list Topologies in {ns}") from e
            out.update((ns, str(item["metadata"]["name"])) for item in listed.get("items", []))
        return out

    def delete_pod(self, ns: str, name: str) -> bool:
        try:
            self.core.delete_namespaced_pod(name, ns, _request_timeout=REQUEST_TIMEOUT)
            return True
        except self.errors as e:
            if self._status(e) == 404:
                return False
            raise _api_error(e, f"delete Pod {ns}/{name}") from e

    def delete_topology(self, ns: str, name: str) -> bool:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                        _request_timeout=REQUEST_TIMEOUT)
            return True
        except self.errors as e:
            if self._status(e) == 404:
                return False
            raise _api_error(e, f"delete Topology {ns}/{name}") from e


def _quiet(_msg: str) -> None:
    pass


def _names(keys: list[tuple[str, str]], limit: int = 8) -> str:
    shown = ", ".join(f"{ns}/{n}" for ns, n in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def create(objects: Objects, client: Any, *, timeout: float = 300.0, poll: float = 0.5,
           progress: Progress = _quiet) -> dict[str, Any]:
    """Create Topologies, then Pods; wait until every pod is Running. Raises TopoKubeError."""
    cluster = _Cluster(client)
    started = time.monotonic()
    outcome: dict[str, int] = {}
    for body in objects.topologies:
        result = cluster.create_topology(body)
        outcome[f"topologies {result}"] = outcome.get(f"topologies {result}", 0) + 1
    progress(f"{len(objects.topologies)} Topologies in place; creating {len(objects.pods)} pods")
    for body in objects.pods:
        result = cluster.create_pod(body)
        outcome[f"pods {result}"] = outcome.get(f"pods {result}", 0) + 1
    wanted = [_key(p) for p in objects.pods]
    namespaces = {ns for ns, _ in wanted}
    deadline = started + timeout
    last = ""
    while True:
        phases = cluster.pod_phases(namespaces)
        failed = [k for k in wanted if phases.get(k) == "Failed"]
        if failed:
            raise TopoKubeError(f"pod(s) failed: {_names(failed)} (kubectl describe pod for why)")
        waiting = [k for k in wanted if phases.get(k) != "Running"]
        line = f"pods Running: {len(wanted) - len(waiting)}/{len(wanted)}"
        if waiting:
            line += f" (waiting for {_names(waiting, 5)})"
        if line != last:
            progress(line)
            last = line
        if not waiting:
            break
        if time.monotonic() >= deadline:
            detail = ", ".join(f"{ns}/{n} {phases.get((ns, n), 'missing')}" for ns, n in waiting[:10])
            raise TopoKubeError(f"timed out after {timeout:g}s: {len(waiting)} of {len(wanted)} pods are not "
                                f"Running: {detail}{' ...' if len(waiting) > 10 else ''}")
        time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
    return {"seconds": round(time.monotonic() - started, 2), "pods": len(wanted),
            "topologies": len(objects.topologies), **outcome}


def destroy(objects: Objects, client: Any, *, timeout: float = 300.0, poll: float = 0.5,
            progress: Progress = _quiet) -> dict[str, Any]:
    """Delete the pods, wait until they are gone, delete the Topologies, wait for those too."""
    cluster = _Cluster(client)
    started = time.monotonic()
    deadline = started + timeout
    pods = [_key(p) for p in objects.pods]
    topologies = [_key(t) for t in objects.topologies]
    deleted_pods = sum(cluster.delete_pod(ns, n) for ns, n in pods)
    progress(f"deleting {deleted_pods} pod(s)")
    _wait_gone("pods", pods, lambda: set(cluster.pod_phases({ns for ns, _ in pods})), deadline, timeout, poll,
               progress)
    deleted_topologies = sum(cluster.delete_topology(ns, n) for ns, n in topologies)
    progress(f"deleting {deleted_topologies} Topologies")
    _wait_gone("Topologies", topologies, lambda: cluster.topology_names({ns for ns, _ in topologies}), deadline,
               timeout, poll, progress)
    return {"seconds": round(time.monotonic() - started, 2), "pods deleted": deleted_pods,
            "topologies deleted": deleted_topologies}


def _wait_gone(what: str, keys: list[tuple[str, str]], present: Callable[[], set[tuple[str, str]]],
               deadline: float, timeout: float, poll: float, progress: Progress) -> None:
    last = -1
    while True:
        left = [k for k in keys if k in present()]
        if not left:
            return
        if len(left) != last:
            progress(f"{what} still there: {len(left)}/{len(keys)} ({_names(left, 5)})")
            last = len(left)
        if time.monotonic() >= deadline:
            raise TopoKubeError(f"timed out after {timeout:g}s: {len(left)} {what} still exist: {_names(left)}")
        time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
