"""The Kubernetes store: Topology custom resources (networkop.co.uk/v1beta1) through the API server.

The only module of meshnet that imports `kubernetes` (~0.5 s): `meshnet.store.open_store` loads it
only for a `kube` URL. Every API call goes through `KubeStore._call`, which takes a token from the
client-side rate limiter, counts the call (`api_calls`, for tests and benchmarks that assert calls
per ADD) and maps failures onto the store's errors:

    connection errors, timeouts, 429, 5xx -> StoreUnavailable
    400, 422                              -> StoreInvalid (with the server's message)
    409 still there after retries         -> StoreConflict
    404                                   -> None / False where the protocol says "not found"

Status is written through the `/status` subresource with `metadata.resourceVersion` set, so the
API server does the compare-and-set; a 409 means someone else wrote first: read again, retry.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

from meshnet.model import GROUP, PLURAL, VERSION, LinkStatus, ManifestError, Topology, TopologyStatus, parse_topology
from meshnet.store.base import (
    CAS_TRIES,
    CompareFailed,
    StatusMutation,
    StoreConflict,
    StoreError,
    StoreInvalid,
    StoreUnavailable,
    WatchEvent,
    backoff,
    merge_link_states,
    update_status_cas,
)
from meshnet.store.resync import EVENT_TYPES, Key, resync_events, track

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
# Client-side throttling. The Python client has none; client-go's default (5 QPS, burst 10) is what
# throttled the original meshnet (2-3 calls per link: ~250 interfaces per node in a 90 s CNI time
# limit). Ours is explicit and generous; the API server's priority and fairness does the rest.
DEFAULT_QPS = 50.0
DEFAULT_BURST = 100
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds; a hung API server must not hang a CNI ADD forever
# Server-side length of one watch request; the watch reconnects (from its last resourceVersion)
# after it. Stopping does not wait for it: the reader's connection is shut down.
WATCH_SECONDS = 300


class TokenBucket:
    """A token bucket: `burst` calls at once, then `qps` calls per second on average; thread-safe.

    `acquire` reserves a token under the lock and sleeps outside it, so waiting callers queue in
    arrival order without holding each other up.
    """

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError(f"rate limit needs qps > 0 and burst >= 1, not qps={qps} burst={burst}")
        self.qps = qps
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is there; returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait


def _message(e: kubernetes.client.ApiException) -> str:
    """The API server's own message (its `Status` body), else the HTTP reason."""
    try:
        body = json.loads(e.body or "")
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"{e.status} {e.reason}"


def _not_found(e: Exception) -> bool:
    return isinstance(e, kubernetes.client.ApiException) and e.status == 404


def _conflict(e: Exception) -> bool:
    return isinstance(e, kubernetes.client.ApiException) and e.status == 409


# A module attribute (not inlined) so that a test can take the pause out.
_backoff = functools.partial(backoff, first=0.001, doublings=8)


class KubeStore:
    """`Store` on Topology CRs. Pass an `api_client` (not closed by `close`), or a `kubeconfig`
    path; with neither, the in-cluster config when the service-account token exists, else the
    default kubeconfig (`$KUBECONFIG`, `~/.kube/config`)."""

    def __init__(self, api_client: Any = None, kubeconfig: str | Path | None = None, qps: float = DEFAULT_QPS,
                 burst: int = DEFAULT_BURST, request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self._owns_client = api_client is None
        if api_client is None:
            api_client = kubernetes.client.ApiClient(self._configuration(kubeconfig))
        self._client = api_client
        self._api = kubernetes.client.CustomObjectsApi(api_client)
        self.limiter = TokenBucket(qps, burst)
        self.request_timeout = request_timeout
        self._count_lock = threading.Lock()
        self.api_calls = 0

    @staticmethod
    def _configuration(kubeconfig: str | Path | None) -> Any:
        config = kubernetes.client.Configuration()
        try:
            if kubeconfig is None and SERVICE_ACCOUNT_TOKEN.exists():
                kubernetes.config.load_incluster_config(client_configuration=config)
            else:
                kubernetes.config.load_kube_config(config_file=None if kubeconfig is None else str(kubeconfig),
                                                   client_configuration=config)
        except (kubernetes.config.ConfigException, OSError) as e:
            raise StoreUnavailable(f"no Kubernetes API configuration: {e}") from e
        # Both loaders install a token-refresh hook that assigns `host` again before EVERY request,
        # and the client then looks the proxy up in the environment again (getproxies: a walk of
        # os.environ) - a quarter of a status write's client CPU. The proxy the environment gave
        # for this host at load is kept as set explicitly: the host setter leaves it alone then.
        config.proxy = config.proxy
        return config

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- one API call --------------------------------------------------------------------------

    def _take_turn(self) -> None:
        """Wait for the rate limiter, then count the call about to be made."""
        self.limiter.acquire()
        with self._count_lock:
            self.api_calls += 1

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Rate-limit, count and run one API call; errors mapped, except 404 and 409 (callers decide)."""
        self._take_turn()
        kwargs.setdefault("_request_timeout", self.request_timeout)
        try:
            return method(*args, **kwargs)
        except kubernetes.client.ApiException as e:
            if e.status in (404, 409):
                raise
            what = f"Kubernetes API ({method.__name__})"
            if e.status in (400, 422):
                raise StoreInvalid(f"{what}: {_message(e)}") from e
            if not e.status or e.status == 429 or e.status >= 500:
                raise StoreUnavailable(f"{what}: {_message(e)}") from e
            raise StoreError(f"{what}: {_message(e)}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise StoreUnavailable(f"Kubernetes API ({method.__name__}) unreachable: {e}") from e

    def _unexpected(self, e: Exception, what: str) -> StoreError:
        """A 404/409 where neither can be part of the answer (e.g. a list: the CRD is missing)."""
        assert isinstance(e, kubernetes.client.ApiException)
        if e.status == 404:
            return StoreUnavailable(f"{what}: {_message(e)} (is the Topology CRD installed?)")
        return StoreConflict(f"{what}: {_message(e)}")

    # -- reads ---------------------------------------------------------------------------------

    def _get_raw(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            raw: dict[str, Any] = self._call(self._api.get_namespaced_custom_object, GROUP, VERSION, namespace,
                                             PLURAL, name)
        except kubernetes.client.ApiException as e:
            if _not_found(e):
                return None
            raise self._unexpected(e, f"get Topology {namespace}/{name}") from e
        return raw

    def get(self, namespace: str, name: str) -> Topology | None:
        """The Topology; an invalid one in the cluster raises ManifestError (the CNI: "topology invalid")."""
        raw = self._get_raw(namespace, name)
        return None if raw is None else Topology.from_api(raw)

    def _list_raw(self, namespace: str | None) -> dict[str, Any]:
        try:
            if namespace is None:
                raw: dict[str, Any] = self._call(self._api.list_cluster_custom_object, GROUP, VERSION, PLURAL)
            else:
                raw = self._call(self._api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
        except kubernetes.client.ApiException as e:
            raise self._unexpected(e, "list Topologies") from e
        return raw

    @staticmethod
    def _parse_items(raw: dict[str, Any]) -> list[Topology]:
        out: list[Topology] = []
        for item in raw.get("items") or ():
            try:
                out.append(Topology.from_api(item))
            except ManifestError as e:
                # One broken CR (written past the CRD schema) must not hide all the others.
                log.warning("skipping an invalid Topology: %s", e)
        return sorted(out, key=lambda t: t.key)

    def list(self, namespace: str | None = None) -> list[Topology]:
        """Valid Topologies, sorted; invalid ones are logged and left out."""
        return self._parse_items(self._list_raw(namespace))

    # -- writes --------------------------------------------------------------------------------

    def apply(self, topology: Topology) -> Topology:
        """Create, or replace the spec of, a Topology; validated first (ManifestError, nothing sent).

        Status is never written here (the API server drops it on create, keeps it on replace).
        Create first: it is the common case and one call; an unchanged spec writes nothing.
        """
        valid = parse_topology(topology.with_status(TopologyStatus()).to_api(), topology.source)
        body = valid.to_api()
        body["metadata"].pop("resourceVersion", None)
        ns, name = valid.namespace, valid.name
        for attempt in range(CAS_TRIES):
            try:
                return Topology.from_api(
                    self._call(self._api.create_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, body))
            except kubernetes.client.ApiException as e:
                if not _conflict(e):
                    raise self._unexpected(e, f"create Topology {ns}/{name}") from e
            current = self._get_raw(ns, name)
            if current is None:
                continue  # deleted since: create again
            if current.get("spec") == body["spec"]:
                return Topology.from_api(current)
            current["spec"] = body["spec"]
            try:
                return Topology.from_api(self._call(self._api.replace_namespaced_custom_object, GROUP, VERSION,
                                                    ns, PLURAL, name, current))
            except kubernetes.client.ApiException:
                _backoff(attempt)  # 409 or 404, all `_call` lets through: changed or deleted since; again
        raise StoreConflict(f"apply Topology {ns}/{name}: lost to other writers {CAS_TRIES} times in a row")

    def delete(self, namespace: str, name: str) -> bool:
        try:
            self._call(self._api.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
        except kubernetes.client.ApiException as e:
            if _not_found(e):
                return False
            raise self._unexpected(e, f"delete Topology {namespace}/{name}") from e
        return True

    def update_status(self, namespace: str, name: str, fn: StatusMutation, *,
                      known: Topology | None = None) -> Topology | None:
        def write(current: Topology, status: TopologyStatus) -> Topology | None:
            body = current.to_api()
            body["status"] = status.to_api()  # metadata.resourceVersion is the compare in CAS
            try:
                return Topology.from_api(self._call(self._api.replace_namespaced_custom_object_status, GROUP,
                                                    VERSION, namespace, PLURAL, name, body), like=current)
            except kubernetes.client.ApiException as e:
                if _not_found(e):
                    return None
                raise CompareFailed from e  # 409: someone wrote first (or the copy was stale)

        return update_status_cas(namespace, name, fn, known, read=lambda: self.get(namespace, name),
                                 write=write, backoff=_backoff)

    def update_link_states(self, namespace: str, name: str, container: str, states: Sequence[LinkStatus], *,
                           known: Topology) -> Topology | None:
        """One JSON patch of just the entries `states` change, guarded by `test`s, so that it applies
        whoever wrote other parts of the status meanwhile (no resourceVersion: no 409 to retry);
        when a guard fails (422) or the patch cannot be built from `known`, the compare-and-set."""
        def merge(cur: Topology) -> TopologyStatus | None:
            return merge_link_states(cur, container, states)

        hint: Topology | None = known
        ops = link_state_patch(known, container, states) if known.key == (namespace, name) else None
        if ops:
            try:
                return Topology.from_api(self._call(self._api.patch_namespaced_custom_object_status, GROUP, VERSION,
                                                    namespace, PLURAL, name, ops,
                                                    _content_type="application/json-patch+json"), like=known)
            except kubernetes.client.ApiException as e:
                if _not_found(e):
                    return None
                # a 409 cannot come without a resourceVersion to compare; a failed guard all the same
            except StoreInvalid:
                pass  # a `test` failed (422): our copy is stale where it matters
            hint = None  # stale: the compare-and-set starts from a fresh read
        return self.update_status(namespace, name, merge, known=hint)

    # -- watch ---------------------------------------------------------------------------------

    def caught_up(self, timeout: float) -> bool:
        """True at once: the API server pushes watch events as they happen, and learning its current
        resourceVersion would cost a request per call (issue 14: reads come from the watch cache)."""
        return True

    def watch(self, namespace: str | None = None, *, stop: Callable[[], bool] = lambda: False,
              timeout: float = 1.0, on_list: Callable[[Sequence[Topology]], None] | None = None
              ) -> Generator[WatchEvent, None, None]:
        """Changes after this call: lists now (for the starting resourceVersion), then follows.

        A reader thread holds the watch connection and feeds a queue, so `stop` is checked every
        `timeout` seconds however quiet the cluster is, without reconnecting that often. A 410 Gone
        (the version was compacted away) re-lists and reports the difference; other failures are
        retried with backoff, as informers do, and logged.
        """
        listed = self._list_raw(namespace)
        known = {t.key: t for t in self._parse_items(listed)}
        version = str(listed.get("metadata", {}).get("resourceVersion") or "")
        if on_list is not None:
            on_list(list(known.values()))
        events: queue.Queue[WatchEvent | BaseException] = queue.Queue()
        reader = _WatchReader(self, namespace, version, known, events)
        reader.start()
        return self._drain(reader, events, stop, timeout)

    @staticmethod
    def _drain(reader: _WatchReader, events: queue.Queue[WatchEvent | BaseException], stop: Callable[[], bool],
               timeout: float) -> Generator[WatchEvent, None, None]:
        try:
            while not stop():
                try:
                    item = events.get(timeout=timeout)
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.stop()


class _WatchReader(threading.Thread):
    """Follows one watch for `KubeStore.watch`, reconnecting from the last version it saw."""

    def __init__(self, store: KubeStore, namespace: str | None, version: str, known: dict[Key, Topology],
                 events: queue.Queue[WatchEvent | BaseException]) -> None:
        super().__init__(name="meshnet-kube-watch", daemon=True)
        self._store = store
        self._namespace = namespace
        self._version = version
        self._known = known
        self._events = events
        self._stopped = threading.Event()
        self._watch = kubernetes.watch.Watch()

    def stop(self) -> None:
        self._stopped.set()
        deadline = time.monotonic() + 5
        # Shutting the open connection down ends the blocked read now. Repeated: a stream that was
        # just opening when we first asked had no connection to shut down yet.
        while self.is_alive() and time.monotonic() < deadline:
            self._watch.stop()
            self.join(timeout=0.1)

    def run(self) -> None:
        failures = 0
        relist = False
        while not self._stopped.is_set():
            try:
                if relist:
                    self._relist()
                    relist = False
                self._follow()
                failures = 0
            except kubernetes.client.ApiException as e:
                if e.status == 410:
                    relist = True
                    continue
                failures += 1
                log.warning("Topology watch failed (%s), retrying", _message(e))
            except (StoreError, urllib3.exceptions.HTTPError, OSError) as e:
                if self._stopped.is_set():
                    return
                failures += 1
                log.warning("Topology watch failed (%s), retrying", e)
            except BaseException as e:  # a bug: hand it to the consumer instead of dying silently
                self._events.put(e)
                return
            if failures:
                self._stopped.wait(min(30.0, 0.1 * 2 ** min(failures, 9)))

    def _follow(self) -> None:
        store, api = self._store, self._store._api
        method: Callable[..., Any]
        args: tuple[str, ...]
        if self._namespace is None:
            method, args = api.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
        else:
            method, args = api.list_namespaced_custom_object, (GROUP, VERSION, self._namespace, PLURAL)
        store._take_turn()
        # Bookmarks move a quiet watch's version on, so its reconnects get fewer 410s.
        kwargs: dict[str, Any] = {"timeout_seconds": WATCH_SECONDS, "allow_watch_bookmarks": True,
                                  "_request_timeout": (store.request_timeout, WATCH_SECONDS + 30)}
        if self._version:
            kwargs["resource_version"] = self._version
        for raw in self._watch.stream(method, *args, **kwargs):
            if self._stopped.is_set():
                return
            kind, obj = raw.get("type"), raw.get("raw_object")
            if not isinstance(obj, dict):
                continue
            self._version = str(obj.get("metadata", {}).get("resourceVersion") or self._version)
            if kind not in EVENT_TYPES:
                continue  # BOOKMARK: only the version matters
            meta = obj.get("metadata")
            # A status write (most events) keeps the spec this watch parsed already.
            like = self._known.get((str(meta.get("namespace") or "default"), str(meta.get("name")))) \
                if kind == "MODIFIED" and isinstance(meta, dict) else None
            try:
                topology = Topology.from_api(obj, like=like)
            except ManifestError as e:
                log.warning("skipping an invalid Topology in a watch: %s", e)
                continue
            seen = self._known.get(topology.key)
            if kind != "DELETED" and seen is not None and seen.resource_version == topology.resource_version:
                continue  # a watch from version "0" starts by listing what we already know
            event = WatchEvent(EVENT_TYPES[kind], topology)
            track(self._known, event)
            self._events.put(event)

    def _relist(self) -> None:
        listed = self._store._list_raw(self._namespace)
        self._version = str(listed.get("metadata", {}).get("resourceVersion") or "")
        for event in resync_events(self._known, KubeStore._parse_items(listed)):
            self._events.put(event)



def link_state_patch(known: Topology, container: str, states: Sequence[LinkStatus]) -> list[dict[str, Any]] | None:
    """The JSON patch (RFC 6902) that turns `known`'s status into `merge_link_states`'s, touching
    only the entries that change, each guarded by a `test` (its index comes from `known`, which
    may be stale): of the container id, and of each replaced link entry and each removed `skipped`
    entry as `known` has it (changed meanwhile: the patch fails whole). None when the merge needs
    more than replacing existing link entries and removing `skipped` entries (a new entry, a new
    `skipped` entry: a test cannot guard an append against a concurrent one) or changes nothing
    by `known` (which a fresh read must confirm): the caller does the compare-and-set then."""
    new = merge_link_states(known, container, states)
    if new is None:
        return None
    old = known.status
    if len(new.links) != len(old.links):
        return None
    index = {s.uid: i for i, s in enumerate(old.links)}
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/status/container_id", "value": container}]
    changes: list[dict[str, Any]] = []
    for entry in new.links:
        i = index.get(entry.uid)
        if i is None:
            return None
        if old.links[i] != entry:
            ops.append({"op": "test", "path": f"/status/links/{i}", "value": old.links[i].to_api()})
            changes.append({"op": "replace", "path": f"/status/links/{i}", "value": entry.to_api()})
    kept = set(new.skipped)
    if not kept <= set(old.skipped):
        return None
    # Removed from the end first: each removal leaves the indices before it as they were.
    for j in reversed(range(len(old.skipped))):
        if old.skipped[j] not in kept:
            gone = old.skipped[j]
            ops.append({"op": "test", "path": f"/status/skipped/{j}",
                        "value": {"pod_name": gone.pod_name, "link_id": gone.link_id}})
            changes.append({"op": "remove", "path": f"/status/skipped/{j}"})
    return ops + changes if changes else None
