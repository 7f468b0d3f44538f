"""A Kubernetes API server for tests: real HTTP on 127.0.0.1, objects in memory.

The code under test talks to it through the official `kubernetes` client, unchanged, so the client's
serialization, error parsing and watch streaming are exercised for real. It serves what meshnet
uses, with the API server's semantics where they matter for correctness:

- any custom resource under `/apis/{group}/{version}/[namespaces/{ns}/]{plural}[/{name}[/status]]`
  and any core resource under `/api/v1/...` (pods, namespaces, ...), stored generically;
- a global `resourceVersion` bumped on every write; stale or missing versions answered like the
  real server (409 Conflict, 422 for an unconditional update of a custom resource); no-op writes
  bump nothing;
- every resource behaves as if it had the status subresource (like the Topology CRD and pods):
  the main resource ignores `status`, `/status` changes only `status`;
- `uid`, `creationTimestamp`, `generation` (bumped when anything outside metadata/status changes)
  set by the server; `status` dropped on create (pods start `Pending`, namespaces `Active`);
- merge, strategic-merge (served as merge) and JSON patches; equality label/field selectors;
- watch with `resourceVersion`, `timeoutSeconds`, chunked JSON lines, 410 after `compact()`;
- request counting and injected faults (`fail_next`, `conflict_next`) for retry tests.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import json
import secrets
import shutil
import socket
import string
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import kubernetes

from .patching import PatchError, json_patch, merge_patch

Obj = dict[str, Any]

TOKEN = "kubeapi-test-token"

# Core kinds, for objects created without `kind` and for the `kind` of empty lists.
_CORE_KINDS = {"pods": "Pod", "namespaces": "Namespace", "configmaps": "ConfigMap", "secrets": "Secret"}

# Metadata the server owns: a write never changes these through the request body.
_SERVER_METADATA = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "resourceVersion",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiRequest(NamedTuple):
    """One request as the server saw it; `query` keeps the last value of each parameter."""

    method: str
    path: str
    query: dict[str, str]


class ApiError(Exception):
    """A failure answered with a `Status` body, the way the API server reports errors."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, details: Obj | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.message = message
        self.details = details

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


@dataclass(frozen=True)
class Target:
    """What a request path addresses."""

    api_version: str  # "v1" or "group/version"
    group: str  # "" for the core group
    plural: str
    namespace: str | None  # None: cluster-scoped object, or a list across all namespaces
    name: str | None  # None: the collection
    subresource: str | None  # "status" or None

    @property
    def resource(self) -> str:
        """How the API server names the resource in messages, e.g. `topologies.networkop.co.uk`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def error(self, code: int, message: str, *, reason: str | None = None) -> ApiError:
        details: Obj = {"name": self.name or "", "kind": self.plural}
        if self.group:
            details["group"] = self.group
        return ApiError(code, message, reason=reason, details=details)

    def not_found(self) -> ApiError:
        return self.error(404, f'{self.resource} "{self.name}" not found')

    def conflict(self) -> ApiError:
        return self.error(
            409,
            f'Operation cannot be fulfilled on {self.resource} "{self.name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
        )


def parse_path(path: str) -> Target | None:
    """Map a URL path onto a resource; None when it is no resource path we serve."""
    segments = [s for s in path.split("/") if s]
    if segments[:2] == ["api", "v1"]:
        group, api_version, rest = "", "v1", segments[2:]
    elif len(segments) >= 3 and segments[0] == "apis":
        group, api_version, rest = segments[1], f"{segments[1]}/{segments[2]}", segments[3:]
    else:
        return None
    namespace: str | None = None
    # `namespaces/{ns}/{plural}...` is a namespaced path; `namespaces[/{name}]` is the Namespace itself.
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not 1 <= len(rest) <= 3 or (len(rest) == 3 and rest[2] != "status"):
        return None
    return Target(
        api_version=api_version,
        group=group,
        plural=rest[0],
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else None,
        subresource=rest[2] if len(rest) > 2 else None,
    )


Key = tuple[str, str, str | None, str]  # (api_version, plural, namespace, name)


@dataclass
class _Event:
    resource_version: int
    type: str
    key: Key
    object: Obj
    # The event as a watch streams it, encoded once for every watcher (as the real API server's
    # watch cache serializes an object once per encoding): each of a lab's daemons watches every
    # Topology, and encoding it again per watcher was the server's, not meshnet's, CPU.
    line: bytes | None = None

    def encoded(self) -> bytes:
        if self.line is None:
            self.line = json.dumps({"type": self.type, "object": self.object}).encode() + b"\n"
        return self.line


@dataclass
class _Fault:
    remaining: int
    code: int
    method: str | None


@dataclass
class _ConflictFault:
    remaining: int
    plural: str | None
    name: str | None


Selector = list[tuple[str, str, str]]  # (key, operator, value); operators "=", "!=", "exists", "!exists"


def parse_selector(text: str) -> Selector:
    """Equality-based selectors (`a=b,c!=d,e,!f`); set-based ones are refused, not misread."""
    terms: Selector = []
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            continue
        if " in " in term or " notin " in term or "(" in term:
            raise ApiError(400, f"set-based selector {term!r} is not supported by this test server")
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "=" in term:
            key, value = term.replace("==", "=", 1).split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif term.startswith("!"):
            terms.append((term[1:].strip(), "!exists", ""))
        else:
            terms.append((term, "exists", ""))
    return terms


def _matches(selector: Selector, values: dict[str, str]) -> bool:
    for key, op, value in selector:
        present = key in values
        if (
            (op == "=" and values.get(key) != value)
            or (op == "!=" and present and values[key] == value)
            or (op == "exists" and not present)
            or (op == "!exists" and present)
        ):
            return False
    return True


def _field_values(obj: Obj, selector: Selector) -> dict[str, str]:
    """The dotted fields a field selector names (`metadata.name`, `status.phase`, ...) as strings."""
    values: dict[str, str] = {}
    for key, _, _ in selector:
        node: Any = obj
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            values[key] = node if isinstance(node, str) else json.dumps(node)
    return values


def _content(obj: Obj) -> Obj:
    """Everything `generation` tracks: all but metadata and status (and the type fields)."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeApiServer:
    """In-memory Kubernetes API server on 127.0.0.1:<random port>, one thread per connection.

    Use as a context manager (or `start()`/`stop()`); then point code at `kubeconfig` (a file
    path) or hand it `api_client()`.
    """

    def __init__(self, *, pod_delete_delay: float = 0.0, require_namespaces: bool = False) -> None:
        # Seconds a deleted pod stays (with deletionTimestamp) before it is gone, like a grace period.
        self.pod_delete_delay = pod_delete_delay
        # When true, creating in a namespace that was not created first is a 404, as on a real cluster.
        self.require_namespaces = require_namespaces
        self.requests: list[ApiRequest] = []
        # Tracebacks of requests that crashed the server: a bug here, never an API answer.
        self.errors: list[str] = []

        self._cond = threading.Condition(threading.RLock())
        self._objects: dict[Key, Obj] = {}
        self._kinds: dict[tuple[str, str], str] = {}
        self._events: list[_Event] = []
        self._resource_version = 0
        self._compacted_at = 0
        self._faults: list[_Fault] = []
        self._conflicts: list[_ConflictFault] = []
        self._timers: list[threading.Timer] = []
        self._stopping = False
        # Seconds between BOOKMARK events on a watch that asked for them (allowWatchBookmarks);
        # the real API server sends one about every minute.
        self.bookmark_interval = 1.0
        self.bookmarks_sent = 0

        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._tmpdir: Path | None = None
        self._clients: list[Any] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> KubeApiServer:
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping = False
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler, self)
        # A short poll interval: `stop()` waits up to one interval, and tests start and stop a lot.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="kubeapi", daemon=True
        )
        self._thread.start()
        self._tmpdir = Path(tempfile.mkdtemp(prefix="kubeapi-"))
        self._write_kubeconfig(self._tmpdir / "kubeconfig")
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()  # ends open watches
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        httpd.shutdown()
        httpd.close_connections()  # threads idling on keep-alive connections would linger otherwise
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- how clients reach it ------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig file for this server (context `kubeapi-test`, namespace `default`)."""
        if self._tmpdir is None:
            raise RuntimeError("server not started")
        return self._tmpdir / "kubeconfig"

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """Write a kubeconfig for this server to `path` (for code that wants its own file)."""
        return self._write_kubeconfig(path, namespace=namespace)

    def _write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubeapi-test", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "kubeapi-test", "user": {"token": TOKEN}}],
            "contexts": [
                {
                    "name": "kubeapi-test",
                    "context": {"cluster": "kubeapi-test", "user": "kubeapi-test", "namespace": namespace},
                }
            ],
            "current-context": "kubeapi-test",
        }
        # JSON is YAML, so the client's loader reads this as is.
        path.write_text(json.dumps(config, indent=2))
        return path

    def configuration(self) -> Any:
        """A `kubernetes.client.Configuration` loaded from `kubeconfig`, as production code would."""
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=config)
        return config

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this server; closed by `stop()`."""
        client = kubernetes.client.ApiClient(self.configuration())
        self._clients.append(client)
        return client

    # -- test controls -------------------------------------------------------------------------

    def reset_counts(self) -> None:
        with self._cond:
            self.requests.clear()

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests seen so far, optionally only those with this method and/or exact path."""
        with self._cond:
            return sum(
                1 for r in self.requests if (method is None or r.method == method) and (path is None or r.path == path)
            )

    def fail_next(self, n: int, code: int = 500, *, method: str | None = None) -> None:
        """The next `n` requests (of `method`, if given) fail with `code` and are not served."""
        with self._cond:
            self._faults.append(_Fault(n, code, method))

    def clear_faults(self) -> None:
        """Requests are served again (what `fail_next` asked for and is not used up yet is dropped)."""
        with self._cond:
            self._faults.clear()

    def conflict_next(self, n: int, *, plural: str | None = None, name: str | None = None) -> None:
        """The next `n` updates (PUT/PATCH, also of `/status`) of an existing object answer 409."""
        with self._cond:
            self._conflicts.append(_ConflictFault(n, plural, name))

    def compact(self) -> None:
        """Forget the event history, like etcd compaction: older watch versions get 410 Expired."""
        with self._cond:
            self._events.clear()
            self._compacted_at = self._resource_version

    def create_objects(self, api_version: str, plural: str, bodies: Iterable[Obj]) -> int:
        """Create objects straight in the store (as a POST each would, without HTTP): seeding a
        cluster of thousands of objects for scale tests. Returns how many were created."""
        group = api_version.split("/")[0] if "/" in api_version else ""
        count = 0
        with self._cond:
            for body in bodies:
                namespace = body.get("metadata", {}).get("namespace")
                self.create(Target(api_version, group, plural, namespace, None, None), body)
                count += 1
        return count

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._resource_version

    def get_object(self, plural: str, namespace: str | None, name: str, api_version: str | None = None) -> Obj | None:
        """A copy of a stored object (any API version unless given), or None."""
        with self._cond:
            for (version, kind, ns, obj_name), obj in self._objects.items():
                if (kind, ns, obj_name) == (plural, namespace, name) and api_version in (None, version):
                    return copy.deepcopy(obj)
        return None

    def list_objects(self, plural: str, namespace: str | None = None) -> list[Obj]:
        """Copies of the stored objects of `plural` (in `namespace`, if given), oldest first."""
        with self._cond:
            found = [
                obj
                for (_, kind, ns, _), obj in self._objects.items()
                if kind == plural and (namespace is None or ns == namespace)
            ]
            return copy.deepcopy(sorted(found, key=lambda o: int(o["metadata"]["resourceVersion"])))

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> Obj:
        """Set a pod's `status.phase` as the kubelet would (a write: new version, MODIFIED event)."""
        key: Key = ("v1", "pods", namespace, name)
        with self._cond:
            current = self._objects.get(key)
            if current is None:
                raise KeyError(f"no pod {namespace}/{name}")
            new = copy.deepcopy(current)
            new.setdefault("status", {})["phase"] = phase
            return copy.deepcopy(self._commit(key, new, "MODIFIED"))

    # -- storage semantics (all under self._cond) ----------------------------------------------

    def _commit(self, key: Key, obj: Obj, event_type: str) -> Obj:
        self._resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self._resource_version)
        if event_type == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        self._events.append(_Event(self._resource_version, event_type, key, copy.deepcopy(obj)))
        self._cond.notify_all()
        return obj

    def _key(self, target: Target) -> Key:
        assert target.name is not None
        return (target.api_version, target.plural, target.namespace, target.name)

    def _existing(self, target: Target) -> Obj:
        obj = self._objects.get(self._key(target))
        if obj is None:
            raise target.not_found()
        return obj

    def _kind(self, target: Target) -> str:
        return self._kinds.get((target.api_version, target.plural)) or _CORE_KINDS.get(target.plural, "")

    def create(self, target: Target, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
            meta["name"] = meta["generateName"] + suffix
        name = meta.get("name")
        if not name:
            raise ApiError(422, "metadata.name: Required value: name or generateName is required")
        if target.namespace is not None:
            if meta.get("namespace") not in (None, "", target.namespace):
                raise ApiError(400, "the namespace of the object does not match the namespace of the request")
            meta["namespace"] = target.namespace
            namespace_key: Key = ("v1", "namespaces", None, target.namespace)
            if self.require_namespaces and namespace_key not in self._objects:
                details = {"name": target.namespace, "kind": "namespaces"}
                raise ApiError(404, f'namespaces "{target.namespace}" not found', details=details)
        named = Target(target.api_version, target.group, target.plural, target.namespace, name, None)
        key = self._key(named)
        if key in self._objects:
            raise named.error(409, f'{named.resource} "{name}" already exists', reason="AlreadyExists")
        for server_owned in _SERVER_METADATA[2:]:
            meta.pop(server_owned, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        obj.setdefault("apiVersion", target.api_version)
        if obj.get("kind"):
            self._kinds.setdefault((target.api_version, target.plural), obj["kind"])
        elif self._kind(target):
            obj["kind"] = self._kind(target)
        # Status is the controllers' to write, through /status: a create cannot set it.
        obj.pop("status", None)
        if target.plural == "pods" and not target.group:
            obj["status"] = {"phase": "Pending"}
        elif target.plural == "namespaces" and not target.group:
            obj["status"] = {"phase": "Active"}
        return self._commit(key, obj, "ADDED")

    def update(self, target: Target, desired: Any, *, version_required: bool) -> Obj:
        """PUT (and the second half of PATCH): `desired` is the whole object the client wants."""
        current = self._existing(target)
        if not isinstance(desired, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self._take_conflict(target)
        meta = desired.get("metadata") or {}
        if meta.get("name") not in (None, target.name):
            raise ApiError(400, f"the name of the object ({meta['name']}) does not match the URL ({target.name})")
        given = meta.get("resourceVersion")
        if given in (None, ""):
            if version_required:
                raise target.error(
                    422,
                    f'{target.resource} "{target.name}" is invalid: metadata.resourceVersion: Invalid value: '
                    "0x0: must be specified for an update",
                )
        elif str(given) != current["metadata"]["resourceVersion"]:
            raise target.conflict()
        if target.subresource == "status":
            new = copy.deepcopy(current)
            if "status" in desired:
                new["status"] = copy.deepcopy(desired["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(desired)
            new.pop("status", None)
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            new_meta = new.setdefault("metadata", {})
            for server_owned in _SERVER_METADATA:
                if server_owned in current["metadata"]:
                    new_meta[server_owned] = current["metadata"][server_owned]
                else:
                    new_meta.pop(server_owned, None)
            for type_field in ("apiVersion", "kind"):
                if type_field in current:
                    new[type_field] = current[type_field]
        if new == current:
            return current  # a no-op write changes nothing, not even the resourceVersion
        if _content(new) != _content(current):
            new["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        return self._commit(self._key(target), new, "MODIFIED")

    def patch(self, target: Target, content_type: str, patch: Any) -> Obj:
        current = self._existing(target)
        media = content_type.split(";", 1)[0].strip().lower()
        try:
            if media in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(patch, dict):
                    raise ApiError(400, "a merge patch must be a JSON object")
                desired = merge_patch(current, patch)
            elif media == "application/json-patch+json":
                desired = json_patch(current, patch)
            else:
                raise ApiError(415, f"the body of the request was in an unknown format: {content_type}")
        except PatchError as e:
            raise target.error(422, f'{target.resource} "{target.name}" is invalid: {e}') from e
        return self.update(target, desired, version_required=False)

    def delete(self, target: Target, options: Any) -> Obj:
        current = self._existing(target)
        preconditions = options.get("preconditions") if isinstance(options, dict) else None
        if preconditions:
            expected_uid = preconditions.get("uid")
            expected_version = preconditions.get("resourceVersion")
            if (expected_uid and expected_uid != current["metadata"]["uid"]) or (
                expected_version and str(expected_version) != current["metadata"]["resourceVersion"]
            ):
                raise target.conflict()
        key = self._key(target)
        if target.plural == "pods" and not target.group and self.pod_delete_delay > 0:
            if "deletionTimestamp" in current["metadata"]:
                return current
            terminating = copy.deepcopy(current)
            terminating["metadata"]["deletionTimestamp"] = _now()
            terminating["metadata"]["deletionGracePeriodSeconds"] = max(1, round(self.pod_delete_delay))
            uid = current["metadata"]["uid"]
            timer = threading.Timer(self.pod_delete_delay, self._finish_delete, (key, uid))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
            return self._commit(key, terminating, "MODIFIED")
        if target.plural == "namespaces" and not target.group:
            # Deleting a namespace deletes what lives in it, as the namespace controller does.
            for inner_key in [k for k in self._objects if k[2] == target.name]:
                self._commit(inner_key, copy.deepcopy(self._objects[inner_key]), "DELETED")
        return self._commit(key, copy.deepcopy(current), "DELETED")

    def _finish_delete(self, key: Key, uid: str) -> None:
        with self._cond:
            obj = self._objects.get(key)
            if obj is not None and obj["metadata"]["uid"] == uid and not self._stopping:
                self._commit(key, copy.deepcopy(obj), "DELETED")

    def _selected(self, target: Target, key: Key, obj: Obj, labels: Selector, fields: Selector) -> bool:
        return (
            key[:2] == (target.api_version, target.plural)
            and (target.namespace is None or key[2] == target.namespace)
            and _matches(labels, obj["metadata"].get("labels") or {})
            and _matches(fields, _field_values(obj, fields))
        )

    def list_collection(self, target: Target, labels: Selector, fields: Selector) -> Obj:
        items = [
            copy.deepcopy(obj) for key, obj in self._objects.items() if self._selected(target, key, obj, labels, fields)
        ]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        kind = self._kind(target)
        return {
            "apiVersion": target.api_version,
            "kind": f"{kind}List" if kind else "List",
            "metadata": {"resourceVersion": str(self._resource_version)},
            "items": items,
        }

    def _take_conflict(self, target: Target) -> None:
        for fault in self._conflicts:
            if fault.plural in (None, target.plural) and fault.name in (None, target.name):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._conflicts.remove(fault)
                raise target.conflict()

    def _take_fault(self, method: str) -> int | None:
        with self._cond:
            for fault in self._faults:
                if fault.method in (None, method):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault.code
        return None

    def _record(self, method: str, path: str, query: dict[str, str]) -> None:
        with self._cond:
            self.requests.append(ApiRequest(method, path, query))

    # -- watch ---------------------------------------------------------------------------------

    def watch(self, target: Target, query: dict[str, str], labels: Selector, fields: Selector
              ) -> Iterator[Obj | _Event]:
        """The events a watch request streams, blocking for new ones until timeout or `stop()`.

        Request errors (a malformed resourceVersion) raise here, before the stream starts.
        """
        timeout = query.get("timeoutSeconds")
        deadline = time.monotonic() + float(timeout) if timeout else None
        start = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks") == "true"
        with self._cond:
            if start in ("", "0"):
                # Like the API server: a watch from "now" first lists the current state as ADDED.
                current = sorted(self._objects.items(), key=lambda kv: int(kv[1]["metadata"]["resourceVersion"]))
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for key, obj in current
                    if self._selected(target, key, obj, labels, fields)
                ]
                return self._follow(initial, self._resource_version, deadline, target, labels, fields, bookmarks)
            if not start.isdigit():
                raise ApiError(400, f"invalid resourceVersion {start!r}")
            if int(start) < self._compacted_at:
                # The real server also answers 200 and reports an expired version as an ERROR event.
                message = f"too old resource version: {start} ({self._compacted_at})"
                gone = ApiError(410, message, reason="Expired")
                return iter([{"type": "ERROR", "object": gone.status()}])
            return self._follow([], int(start), deadline, target, labels, fields, bookmarks)

    def _follow(
        self,
        initial: list[Obj],
        cursor: int,
        deadline: float | None,
        target: Target,
        labels: Selector,
        fields: Selector,
        bookmarks: bool = False,
    ) -> Iterator[Obj | _Event]:
        yield from initial
        last_sent = time.monotonic()
        while True:
            with self._cond:
                while self._resource_version <= cursor and not self._stopping:
                    now = time.monotonic()
                    remaining = None if deadline is None else deadline - now
                    if remaining is not None and remaining <= 0:
                        return
                    if bookmarks and now - last_sent >= self.bookmark_interval:
                        break
                    waits = [w for w in (remaining, last_sent + self.bookmark_interval - now if bookmarks else None)
                             if w is not None]
                    self._cond.wait(min(waits) if waits else None)
                if self._stopping:
                    return
                first = bisect.bisect_right(self._events, cursor, key=lambda e: e.resource_version)
                batch: list[Obj | _Event] = [
                    e for e in self._events[first:] if self._selected(target, e.key, e.object, labels, fields)
                ]
                cursor = self._resource_version
                if not batch and bookmarks and time.monotonic() - last_sent >= self.bookmark_interval:
                    # Nothing for this watch for a while: a BOOKMARK moves its version on (as the
                    # real server's, an object with only apiVersion, kind and resourceVersion).
                    self.bookmarks_sent += 1
                    batch = [{"type": "BOOKMARK", "object": {
                        "apiVersion": target.api_version, "kind": self._kinds.get((target.api_version, target.plural),
                                                                                  "Object"),
                        "metadata": {"resourceVersion": str(cursor)}}}]
            if batch:
                last_sent = time.monotonic()
            yield from batch

    # -- HTTP ----------------------------------------------------------------------------------

    def handle(self, method: str, target: Target, query: dict[str, str], content_type: str, body: Any) -> Obj:
        """Serve one non-watch request; the answer is the JSON body of a 200 or 201."""
        with self._cond:
            if method == "GET" and target.name is not None:
                return copy.deepcopy(self._existing(target))
            if method == "GET":
                labels = parse_selector(query.get("labelSelector", ""))
                fields = parse_selector(query.get("fieldSelector", ""))
                return self.list_collection(target, labels, fields)
            if target.subresource is not None and method not in ("PUT", "PATCH"):
                raise ApiError(405, f"{method} is not supported on the {target.subresource} subresource")
            if method == "POST" and target.name is None:
                return copy.deepcopy(self.create(target, body))
            if method == "PUT" and target.name is not None:
                return copy.deepcopy(self.update(target, body, version_required=bool(target.group)))
            if method == "PATCH" and target.name is not None:
                return copy.deepcopy(self.patch(target, content_type, body))
            if method == "DELETE" and target.name is not None:
                return copy.deepcopy(self.delete(target, body))
        raise ApiError(405, f"{method} is not supported on {'an object' if target.name else 'a collection'}")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's listen backlog is 5: a burst of clients connecting at once (threads released
    # by a barrier, a lab's daemons) gets connections reset, which an API server does not do.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], api: KubeApiServer):
        self.api = api
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client hanging up mid-answer (a watch stopped, a test's connection closed) is normal for
        # an API server; anything else is a bug of this server and fails the test through `errors`.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            return
        self.api.errors.append(traceback.format_exc())

    def close_connections(self) -> None:
        with self.connections_lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):  # the peer closed it already
                    connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams, like the real server
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes; with Nagle's algorithm on, the client's
        # delayed ACK would hold every response back by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):  # the client went away; nothing left to flush to
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the request log is `KubeApiServer.requests`."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        api._record(method, url.path, query)
        length = int(self.headers.get("Content-Length") or 0)
        # Read the body even when refusing the request, so the connection stays usable.
        raw = self.rfile.read(length) if length else b""
        try:
            try:
                fault = api._take_fault(method)
                if fault is not None:
                    raise ApiError(fault, f"injected failure ({fault})")
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    raise ApiError(401, "Unauthorized")
                target = parse_path(url.path)
                if target is None:
                    raise ApiError(404, "the server could not find the requested resource")
                try:
                    body = json.loads(raw) if raw else None
                except ValueError as e:
                    raise ApiError(400, f"the request body is not JSON: {e}") from e
                watch = query.get("watch", "").lower() in ("true", "t", "1")  # Go's ParseBool spellings
                if method == "GET" and target.name is None and watch:
                    self._stream_watch(api, target, query)
                    return
                answer = api.handle(method, target, query, self.headers.get("Content-Type", ""), body)
                self._send_json(201 if method == "POST" else 200, answer)
            except ApiError as e:
                self._send_json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:
            api.errors.append(traceback.format_exc())
            try:
                self._send_json(500, ApiError(500, f"test server bug: {e!r}").status())
            except OSError:
                self.close_connection = True

    def _send_json(self, code: int, payload: Obj) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream_watch(self, api: KubeApiServer, target: Target, query: dict[str, str]) -> None:
        labels = parse_selector(query.get("labelSelector", ""))
        fields = parse_selector(query.get("fieldSelector", ""))
        events = api.watch(target, query, labels, fields)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                # A stored event is immutable once committed: its encoding is shared by every watcher.
                line = event.encoded() if isinstance(event, _Event) else json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
