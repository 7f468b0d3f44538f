"""The Kubernetes API test server, driven through the real `kubernetes` client."""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any, cast

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from tests.kubeapi import fixtures
from tests.kubeapi.patching import PatchError, json_patch, merge_patch
from tests.kubeapi.server import TOKEN, KubeApiServer, parse_path

# Until the project's conftest imports it, the fixture is taken from its module here.
kube_api = fixtures.kube_api

GROUP, VERSION, PLURAL = "networkop.co.uk", "v1beta1", "topologies"
NS = "default"
TOPO_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"


def topology(name: str, *, uid: int = 1, peer: str = "r2", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Topology",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"links": [{"uid": uid, "peer_pod": peer, "local_intf": "eth1", "peer_intf": "eth1"}]},
        "status": {"src_ip": "should-be-dropped"},
    }


def pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": "alpine"}]},
    }


@pytest.fixture
def crd(kube_api: KubeApiServer) -> Any:
    return kubernetes.client.CustomObjectsApi(kube_api.api_client())


@pytest.fixture
def core(kube_api: KubeApiServer) -> Any:
    return kubernetes.client.CoreV1Api(kube_api.api_client())


def create(crd: Any, body: dict[str, Any], namespace: str = NS) -> dict[str, Any]:
    result: dict[str, Any] = crd.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return result


def get(crd: Any, name: str) -> dict[str, Any]:
    result: dict[str, Any] = crd.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
    return result


def status_body(error: ApiException) -> dict[str, Any]:
    assert error.body is not None
    body: dict[str, Any] = json.loads(error.body)
    return body


# -- connection ---------------------------------------------------------------------------------


def test_kubeconfig_reaches_server_with_its_token(kube_api: KubeApiServer) -> None:
    with kubernetes.config.new_client_from_config(config_file=str(kube_api.kubeconfig)) as client:
        api = kubernetes.client.CustomObjectsApi(client)
        listing: dict[str, Any] = cast(dict[str, Any], api.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL))
    assert listing["items"] == []
    assert listing["metadata"]["resourceVersion"] == "0"
    assert kube_api.requests[-1].path == TOPO_PATH

    conn = http.client.HTTPConnection("127.0.0.1", kube_api.port, timeout=5)
    try:
        conn.request("GET", TOPO_PATH)  # no token
        response = conn.getresponse()
        assert response.status == 401
        assert json.loads(response.read())["reason"] == "Unauthorized"
    finally:
        conn.close()


def test_paths_map_onto_resources() -> None:
    topo = parse_path(f"{TOPO_PATH}/r1/status")
    assert topo is not None
    assert (topo.api_version, topo.plural, topo.namespace, topo.name, topo.subresource) == (
        f"{GROUP}/{VERSION}",
        PLURAL,
        NS,
        "r1",
        "status",
    )
    namespace = parse_path("/api/v1/namespaces/lab")
    assert namespace is not None
    assert (namespace.plural, namespace.namespace, namespace.name) == ("namespaces", None, "lab")
    cluster_list = parse_path(f"/apis/{GROUP}/{VERSION}/{PLURAL}")
    assert cluster_list is not None
    assert (cluster_list.namespace, cluster_list.name) == (None, None)
    assert parse_path("/api/v1/namespaces/x/pods/p/log") is None
    assert parse_path("/version") is None


# -- custom resources -----------------------------------------------------------------------------


def test_topology_lifecycle(kube_api: KubeApiServer, crd: Any) -> None:
    created = create(crd, topology("r1"))
    meta = created["metadata"]
    assert meta["namespace"] == NS
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    assert meta["resourceVersion"] == "1"
    assert "status" not in created  # a create cannot set status (status subresource)

    assert get(crd, "r1") == created
    create(crd, topology("r2", peer="r1"))
    listing = crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert [item["metadata"]["name"] for item in listing["items"]] == ["r1", "r2"]
    assert listing["metadata"]["resourceVersion"] == "2"
    assert listing["kind"] == "TopologyList"

    replacement = get(crd, "r1")
    replacement["spec"]["links"][0]["local_ip"] = "12.12.12.1/24"
    replaced = crd.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r1", replacement)
    assert replaced["spec"]["links"][0]["local_ip"] == "12.12.12.1/24"
    assert replaced["metadata"]["generation"] == 2
    assert replaced["metadata"]["resourceVersion"] == "3"
    assert replaced["metadata"]["uid"] == meta["uid"]

    merged = crd.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "r1", {"metadata": {"labels": {"lab": "a"}}, "spec": {"extra": None}}
    )
    assert merged["metadata"]["labels"] == {"lab": "a"}
    assert merged["metadata"]["generation"] == 2  # labels are metadata: no new generation
    assert merged["spec"]["links"] == replaced["spec"]["links"]

    patched = crd.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        "r1",
        [{"op": "replace", "path": "/spec/links/0/peer_intf", "value": "eth9"}],
        _content_type="application/json-patch+json",
    )
    assert patched["spec"]["links"][0]["peer_intf"] == "eth9"
    assert patched["metadata"]["generation"] == 3

    deleted = crd.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r1")
    assert deleted["metadata"]["name"] == "r1"
    assert int(deleted["metadata"]["resourceVersion"]) == kube_api.resource_version
    with pytest.raises(ApiException) as missing:
        get(crd, "r1")
    assert missing.value.status == 404
    assert kube_api.get_object(PLURAL, NS, "r1") is None
    assert [o["metadata"]["name"] for o in kube_api.list_objects(PLURAL)] == ["r2"]


def test_stale_resource_version_is_a_conflict_status(crd: Any) -> None:
    stale = create(crd, topology("r1"))
    crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r1", {"spec": {"links": []}})

    with pytest.raises(ApiException) as replace:
        crd.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r1", stale)
    assert replace.value.status == 409
    body = status_body(replace.value)
    assert body["kind"] == "Status"
    assert body["apiVersion"] == "v1"
    assert body["status"] == "Failure"
    assert body["reason"] == "Conflict"
    assert body["code"] == 409
    assert 'topologies.networkop.co.uk "r1"' in body["message"]

    with pytest.raises(ApiException) as patch:
        crd.patch_namespaced_custom_object_status(
            GROUP, VERSION, NS, PLURAL, "r1", {"metadata": {"resourceVersion": "1"}, "status": {"net_ns": "x"}}
        )
    assert patch.value.status == 409

    # Custom resources refuse unconditional updates, as the real API server does.
    unconditional = get(crd, "r1")
    del unconditional["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as invalid:
        crd.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r1", unconditional)
    assert invalid.value.status == 422
    assert status_body(invalid.value)["reason"] == "Invalid"


def test_missing_object_is_a_not_found_status(crd: Any, core: Any) -> None:
    with pytest.raises(ApiException) as topo:
        get(crd, "ghost")
    assert topo.value.status == 404
    body = status_body(topo.value)
    assert (body["kind"], body["status"], body["reason"], body["code"]) == ("Status", "Failure", "NotFound", 404)
    assert body["message"] == 'topologies.networkop.co.uk "ghost" not found'
    assert body["details"] == {"name": "ghost", "group": GROUP, "kind": PLURAL}

    for call in (
        lambda: crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "ghost", {"spec": {}}),
        lambda: crd.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "ghost"),
        lambda: core.read_namespaced_pod("ghost", NS),
    ):
        with pytest.raises(ApiException) as error:
            call()
        assert error.value.status == 404


def test_create_of_existing_name_is_already_exists(crd: Any) -> None:
    create(crd, topology("r1"))
    with pytest.raises(ApiException) as error:
        create(crd, topology("r1"))
    assert error.value.status == 409
    assert status_body(error.value)["reason"] == "AlreadyExists"
    create(crd, topology("r1"), namespace="other")  # same name, other namespace: a different object


def test_status_subresource_is_isolated_from_the_main_resource(crd: Any) -> None:
    created = create(crd, topology("r1"))

    with_status = crd.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        "r1",
        {"status": {"src_ip": "198.51.100.1", "net_ns": "/run/netns/a"}, "spec": {"links": []}},
    )
    assert with_status["status"] == {"src_ip": "198.51.100.1", "net_ns": "/run/netns/a"}
    assert with_status["spec"] == created["spec"]  # spec in a status write is ignored
    assert with_status["metadata"]["generation"] == 1  # status never bumps the generation
    assert int(with_status["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])

    main = dict(with_status, status={"src_ip": "ignored"})
    main["spec"] = {"links": []}
    replaced = crd.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r1", main)
    assert replaced["spec"] == {"links": []}
    assert replaced["status"] == with_status["status"]  # status in a main-resource write is ignored

    full = get(crd, "r1")
    full["status"]["container_id"] = "abc"
    put_status = crd.replace_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "r1", full)
    assert put_status["status"]["container_id"] == "abc"
    assert crd.get_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "r1") == put_status


def test_concurrent_compare_and_set_loses_no_update(kube_api: KubeApiServer, crd: Any) -> None:
    create(crd, topology("r1"))
    crd.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "r1", {"status": {"count": 0}})
    conflicts = 0
    lock = threading.Lock()

    def increment(times: int) -> None:
        nonlocal conflicts
        for _ in range(times):
            while True:
                current = crd.get_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "r1")
                current["status"]["count"] += 1
                try:
                    crd.replace_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "r1", current)
                    break
                except ApiException as e:
                    assert e.status == 409
                    with lock:
                        conflicts += 1

    threads = [threading.Thread(target=increment, args=(10,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert get(crd, "r1")["status"]["count"] == 40
    assert kube_api.count("PUT") == 40 + conflicts


def test_no_op_write_changes_no_version(kube_api: KubeApiServer, crd: Any) -> None:
    created = create(crd, topology("r1"))
    same = crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r1", {"spec": created["spec"]})
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert kube_api.resource_version == 1


def test_label_selector_and_cluster_wide_list(crd: Any) -> None:
    create(crd, topology("r1", labels={"lab": "a"}))
    create(crd, topology("r2", labels={"lab": "b"}))
    create(crd, topology("r3", labels={"lab": "a"}), namespace="other")

    def names(listing: dict[str, Any]) -> list[str]:
        return [f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in listing["items"]]

    assert names(crd.list_cluster_custom_object(GROUP, VERSION, PLURAL)) == ["default/r1", "default/r2", "other/r3"]
    assert names(crd.list_cluster_custom_object(GROUP, VERSION, PLURAL, label_selector="lab=a")) == [
        "default/r1",
        "other/r3",
    ]
    assert names(crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, label_selector="lab!=a")) == [
        "default/r2"
    ]
    assert names(crd.list_cluster_custom_object(GROUP, VERSION, PLURAL, field_selector="metadata.name=r3")) == [
        "other/r3"
    ]


# -- watch ----------------------------------------------------------------------------------------


def test_watch_streams_added_modified_deleted_live(kube_api: KubeApiServer, crd: Any) -> None:
    start = crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["metadata"]["resourceVersion"]
    events: list[tuple[str, str, str]] = []
    watcher = kubernetes.watch.Watch()

    def follow() -> None:
        for event in watcher.stream(
            crd.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            resource_version=start,
            timeout_seconds=5,
        ):
            obj = event["object"]
            events.append((event["type"], obj["metadata"]["name"], obj["metadata"]["resourceVersion"]))
            if event["type"] == "DELETED":
                watcher.stop()

    thread = threading.Thread(target=follow)
    thread.start()
    deadline = time.monotonic() + 5
    while kube_api.count("GET", TOPO_PATH) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the watch request has arrived; the writes below happen while it is open
    create(crd, topology("r1"))
    crd.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "r1", {"status": {"net_ns": "n"}})
    create(crd, topology("r2"), namespace="other")  # other namespace: not in this watch
    crd.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r1")
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert events == [("ADDED", "r1", "1"), ("MODIFIED", "r1", "2"), ("DELETED", "r1", "4")]


def test_watch_without_version_lists_current_state_then_times_out(kube_api: KubeApiServer, crd: Any) -> None:
    create(crd, topology("r1"))
    create(crd, topology("r2"))
    began = time.monotonic()
    events = list(
        kubernetes.watch.Watch().stream(
            crd.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            field_selector="metadata.name=r2",
            timeout_seconds=1,
        )
    )
    elapsed = time.monotonic() - began
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "r2")]
    assert 0.9 <= elapsed < 3
    assert kube_api.requests[-1].query["timeoutSeconds"] == "1"
    assert kube_api.requests[-1].query["watch"] == "true"


def test_watch_from_before_compaction_is_expired(kube_api: KubeApiServer, crd: Any) -> None:
    create(crd, topology("r1"))
    create(crd, topology("r2"))
    kube_api.compact()  # the ADDED of r2 (version 2) is forgotten: a watch from 1 cannot be served
    with pytest.raises(ApiException) as error:
        list(
            kubernetes.watch.Watch().stream(
                crd.list_namespaced_custom_object,
                GROUP,
                VERSION,
                NS,
                PLURAL,
                resource_version="1",
                timeout_seconds=1,
            )
        )
    assert error.value.status == 410


def test_pod_watch_is_typed_by_the_client(kube_api: KubeApiServer, core: Any) -> None:
    core.create_namespaced_pod(NS, pod("p1"))
    kube_api.set_pod_phase(NS, "p1", "Running")
    events = list(
        kubernetes.watch.Watch().stream(core.list_namespaced_pod, NS, resource_version="0", timeout_seconds=1)
    )
    assert [(e["type"], e["object"].metadata.name, e["object"].status.phase) for e in events] == [
        ("ADDED", "p1", "Running")
    ]


def test_stop_ends_open_watches(kube_api: KubeApiServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", kube_api.port, timeout=5)
    try:
        conn.request("GET", f"{TOPO_PATH}?watch=1", headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Transfer-Encoding") == "chunked"
        began = time.monotonic()
        kube_api.stop()
        assert response.read() == b""  # the stream ended cleanly when the server stopped
        assert time.monotonic() - began < 2
    finally:
        conn.close()


# -- core: namespaces and pods --------------------------------------------------------------------


def test_pods_and_namespaces(kube_api: KubeApiServer, core: Any) -> None:
    namespace = core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lab"}})
    assert namespace.status.phase == "Active"
    assert [n.metadata.name for n in core.list_namespace().items] == ["lab"]
    assert core.read_namespace("lab").metadata.uid == namespace.metadata.uid

    created = core.create_namespaced_pod("lab", pod("p1"))
    assert created.status.phase == "Pending"
    kube_api.set_pod_phase("lab", "p1", "Running")
    assert core.read_namespaced_pod("p1", "lab").status.phase == "Running"
    assert [p.metadata.name for p in core.list_namespaced_pod("lab").items] == ["p1"]

    deleted = core.delete_namespaced_pod("p1", "lab")
    assert deleted.metadata.name == "p1"
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_pod("p1", "lab")
    assert gone.value.status == 404

    core.create_namespaced_pod("lab", pod("p2"))
    core.delete_namespace("lab")  # takes what lives in it along
    assert core.list_namespaced_pod("lab").items == []
    assert core.list_namespace().items == []

    with pytest.raises(KeyError):
        kube_api.set_pod_phase("lab", "p2", "Running")


def test_pod_deletion_can_take_a_while(kube_api: KubeApiServer, core: Any) -> None:
    kube_api.pod_delete_delay = 0.3
    core.create_namespaced_pod(NS, pod("p1"))
    began = time.monotonic()
    core.delete_namespaced_pod("p1", NS)
    terminating = core.read_namespaced_pod("p1", NS)
    assert terminating.metadata.deletion_timestamp is not None
    while time.monotonic() - began < 3:
        try:
            core.read_namespaced_pod("p1", NS)
        except ApiException as e:
            assert e.status == 404
            break
        time.sleep(0.05)
    else:
        pytest.fail("the pod never went away")
    assert 0.3 <= time.monotonic() - began < 3


def test_namespaces_can_be_required(kube_api: KubeApiServer, core: Any) -> None:
    kube_api.require_namespaces = True
    with pytest.raises(ApiException) as error:
        core.create_namespaced_pod("nowhere", pod("p1"))
    assert error.value.status == 404
    assert status_body(error.value)["message"] == 'namespaces "nowhere" not found'


def test_delete_preconditions(crd: Any) -> None:
    create(crd, topology("r1"))
    with pytest.raises(ApiException) as error:
        crd.delete_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, "r1", body={"preconditions": {"uid": "not-the-uid"}}
        )
    assert error.value.status == 409
    assert get(crd, "r1")["metadata"]["name"] == "r1"


# -- counting and faults --------------------------------------------------------------------------


def test_every_request_is_counted(kube_api: KubeApiServer, crd: Any) -> None:
    create(crd, topology("r1"))
    kube_api.reset_counts()
    get(crd, "r1")
    crd.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "r1", {"status": {"net_ns": "n"}})
    crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, label_selector="a=b")
    assert [(r.method, r.path) for r in kube_api.requests] == [
        ("GET", f"{TOPO_PATH}/r1"),
        ("PATCH", f"{TOPO_PATH}/r1/status"),
        ("GET", TOPO_PATH),
    ]
    assert kube_api.requests[2].query == {"labelSelector": "a=b"}
    assert kube_api.count() == 3
    assert kube_api.count("GET") == 2
    assert kube_api.count("PATCH", f"{TOPO_PATH}/r1/status") == 1
    kube_api.reset_counts()
    assert kube_api.requests == []


def test_fail_next_fails_exactly_n_requests(kube_api: KubeApiServer, crd: Any) -> None:
    create(crd, topology("r1"))
    kube_api.fail_next(2, 503)
    for _ in range(2):
        with pytest.raises(ApiException) as error:
            get(crd, "r1")
        assert error.value.status == 503
        assert status_body(error.value)["reason"] == "ServiceUnavailable"
    assert get(crd, "r1")["metadata"]["name"] == "r1"

    kube_api.fail_next(1, 500, method="PATCH")
    get(crd, "r1")  # other methods pass
    with pytest.raises(ApiException) as patch:
        crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r1", {"spec": {"x": 1}})
    assert patch.value.status == 500
    assert "x" not in get(crd, "r1")["spec"]  # a failed request is not applied


def test_conflict_next_refuses_n_updates(kube_api: KubeApiServer, crd: Any) -> None:
    create(crd, topology("r1"))
    create(crd, topology("r2"))
    kube_api.conflict_next(2, name="r1")
    crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r2", {"spec": {"x": 1}})  # not r1
    for _ in range(2):
        with pytest.raises(ApiException) as error:
            crd.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "r1", {"status": {"a": 1}})
        assert error.value.status == 409
        assert status_body(error.value)["reason"] == "Conflict"
    assert "status" not in get(crd, "r1")
    patched = crd.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "r1", {"status": {"a": 1}})
    assert patched["status"] == {"a": 1}


# -- patch documents (RFC 7386 and RFC 6902 examples) ---------------------------------------------


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ],
)
def test_merge_patch_rfc7386(target: Any, patch: Any, expected: Any) -> None:
    assert merge_patch(target, patch) == expected


def test_json_patch_rfc6902() -> None:
    doc = {"foo": ["bar", "baz"], "a/b": 1, "m~n": 2}
    patched = json_patch(
        doc,
        [
            {"op": "add", "path": "/foo/1", "value": "qux"},
            {"op": "add", "path": "/foo/-", "value": "end"},
            {"op": "remove", "path": "/a~1b"},
            {"op": "replace", "path": "/m~0n", "value": 3},
            {"op": "copy", "from": "/foo/0", "path": "/first"},
            {"op": "move", "from": "/first", "path": "/moved"},
            {"op": "test", "path": "/moved", "value": "bar"},
        ],
    )
    assert patched == {"foo": ["bar", "qux", "baz", "end"], "m~n": 3, "moved": "bar"}
    assert doc == {"foo": ["bar", "baz"], "a/b": 1, "m~n": 2}  # the input is untouched
    for bad in (
        [{"op": "test", "path": "/foo/0", "value": "nope"}],
        [{"op": "replace", "path": "/missing", "value": 1}],
        [{"op": "remove", "path": "/foo/5"}],
        [{"op": "frobnicate", "path": "/foo"}],
        {"op": "add"},
    ):
        with pytest.raises(PatchError):
            json_patch(doc, bad)


def test_failed_json_patch_is_invalid(crd: Any) -> None:
    create(crd, topology("r1"))
    with pytest.raises(ApiException) as error:
        crd.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            PLURAL,
            "r1",
            [{"op": "test", "path": "/spec/links/0/uid", "value": 99}],
            _content_type="application/json-patch+json",
        )
    assert error.value.status == 422


def test_context_manager_frees_the_port() -> None:
    with KubeApiServer() as server:
        port = server.port
        kubeconfig = server.kubeconfig
        assert kubeconfig.exists()
    assert not kubeconfig.exists()
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
