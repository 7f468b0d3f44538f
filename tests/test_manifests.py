"""The install manifests: kustomize renders them, Kubernetes' schemas accept them, the CRD's schema
accepts every Topology in tests/*.yml and rejects what meshnet cannot build.

There is no API server here. Instead:
- every rendered object is checked against the OpenAPI schema of its kind for Kubernetes 1.27 (the
  oldest release whose CRD features we use) and the newest release kubernetes-validate ships, in
  strict mode (unknown fields are errors, as with `kubectl apply --validate=strict`);
- the CRD is checked for the rules the API server adds on top ("structural schema"), and its
  openAPIV3Schema is run through jsonschema on good and bad Topologies, with unknown fields
  rejected as kubectl's strict field validation does.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from meshnet.cni.offline import DEFAULT_INDEX

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
TARGETS = ["base", *(f"overlays/{name}" for name in OVERLAYS)]
K8S_VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
TOPOLOGY_FILES = sorted(p for p in ROOT.glob("tests/*.yml") if "kind: Topology" in p.read_text())


def kustomize(target: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render manifests/"
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / target)], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {target: kustomize(target) for target in TARGETS}


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def crd_schema(objects: list[dict[str, Any]]) -> dict[str, Any]:
    crd = only(objects, "CustomResourceDefinition")
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as the API server applies it with strict field validation: objects with declared
    properties reject undeclared ones unless they preserve unknown fields. `metadata` is the API
    server's own business (ObjectMeta) and stays open."""
    schema = copy.deepcopy(schema)

    def walk(node: dict[str, Any], path: str) -> None:
        props = node.get("properties")
        if props is not None and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for name, child in (props or {}).items():
            if f"{path}.{name}" != ".metadata":
                walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "")
    return schema


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    # The API server's regexes are RE2, where `$` is the end of the text; Python's `$` also
    # matches before a final line break, which would let "r1\n" pass here but not there.
    if validator.is_type(instance, "string") and not re.search(pattern.replace("$", r"\Z"), instance):
        yield jsonschema.ValidationError(f"{instance[:80]!r} does not match {pattern[:80]!r}")


ApiServerValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": _re2_pattern})


def topology_problems(schema: dict[str, Any], topology: dict[str, Any]) -> list[str]:
    """What the API server would reject in `topology` (schema + list-map key uniqueness)."""
    validator = ApiServerValidator(strict(schema))
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(topology)]
    links = topology.get("spec", {}).get("links", [])
    uids = [link.get("uid") for link in links if isinstance(link, dict)]
    problems += [f"spec.links: duplicate uid {uid}" for uid in {u for u in uids if uids.count(u) > 1}]
    return problems


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}[]")


# --- rendering and Kubernetes schemas ---------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_renders_the_whole_install(rendered: dict[str, list[dict[str, Any]]], target: str) -> None:
    kinds = sorted(o["kind"] for o in rendered[target])
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "DaemonSet",
                     "Namespace", "ServiceAccount"]
    for obj in rendered[target]:
        if obj["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "meshnet", obj["kind"]


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_against_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], target: str, k8s_version: str
) -> None:
    for obj in rendered[target]:
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{target}: {obj['kind']}/{obj['metadata']['name']} (Kubernetes {k8s_version}): "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


def test_the_schema_check_catches_a_broken_object(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Canary: the validator really looks (a typo in a DaemonSet field is an error)."""
    ds = copy.deepcopy(only(rendered["base"], "DaemonSet"))
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)


# --- the CRD -----------------------------------------------------------------------------------


def test_crd_names_match_the_original(rendered: dict[str, list[dict[str, Any]]]) -> None:
    crd = only(rendered["base"], "CustomResourceDefinition")
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "topologies.networkop.co.uk"
    assert (spec["group"], spec["scope"]) == ("networkop.co.uk", "Namespaced")
    assert spec["names"] == {"kind": "Topology", "listKind": "TopologyList", "plural": "topologies",
                             "singular": "topology", "shortNames": ["topo"]}
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1beta1", True, True)
    assert version["subresources"] == {"status": {}}


def test_crd_schema_is_structural(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The API server's extra rules for CRD schemas, which no generic validator knows."""
    schema = crd_schema(rendered["base"])
    value_validations = {"enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "format",
                         "minItems", "maxItems", "multipleOf", "uniqueItems", "not", "allOf", "anyOf", "oneOf"}
    for path, node in schema_nodes(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path or '.'}: no type"
        for combinator in ("not", "allOf", "anyOf", "oneOf"):
            subs = node.get(combinator, [])
            for sub in [subs] if isinstance(subs, dict) else subs:
                assert set(sub) <= value_validations, f"{path}.{combinator}: only value validations allowed"
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", []), f"{path}: list-map key {key} must be required"
                assert item["properties"][key]["type"] in ("integer", "string"), f"{path}: key {key} not scalar"
        if "pattern" in node:
            # Go's RE2 has no look-arounds or back-references.
            assert not re.search(r"\(\?[=!<]|\\[1-9]", node["pattern"]), f"{path}: pattern not RE2-compatible"
    jsonschema.Draft7Validator.check_schema(schema)


def test_printer_columns(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (version,) = only(rendered["base"], "CustomResourceDefinition")["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Node", "VTEP", "Links", "Admin", "Impairments", "Unavailable", "Alive", "Error", "Age"]
    # What is in force per end (issue 15): `kubectl get topo -o wide` only.
    assert [columns[c].get("priority") for c in ("Admin", "Impairments", "Unavailable")] == [1, 1, 1]
    assert columns["Node"]["jsonPath"] == ".status.node"
    assert columns["VTEP"]["jsonPath"] == ".status.src_ip"
    assert columns["Alive"]["jsonPath"] == ".status.net_ns"
    assert columns["Age"]["type"] == "date"
    status = crd_schema(rendered["base"])["properties"]["status"]["properties"]
    for column in columns.values():
        first = column["jsonPath"].split(".")[1:3]
        if first[0] == "status":
            assert first[1].split("[")[0] in status, f"{column['name']}: {column['jsonPath']} is not in the schema"


@pytest.mark.parametrize("path", TOPOLOGY_FILES, ids=lambda p: p.name)
def test_crd_accepts_the_test_topologies(rendered: dict[str, list[dict[str, Any]]], path: Path) -> None:
    schema = crd_schema(rendered["base"])
    topologies = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "Topology"]
    for topology in topologies:
        assert topology_problems(schema, topology) == [], topology["metadata"]["name"]


def _topology(**link: Any) -> dict[str, Any]:
    base = {"uid": 1, "peer_pod": "r2", "local_intf": "eth1", "peer_intf": "eth1"}
    return {"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": {"name": "r1"},
            "spec": {"links": [{**base, **link}]}}


GOOD = {
    "minimal": {},
    "addresses v4": {"local_ip": "12.12.12.1/24", "peer_ip": "12.12.12.2/24"},
    "addresses v6": {"local_ip": "2001:db8::1/64", "peer_ip": "2001:db8::2/64"},
    "address v6 full": {"local_ip": "2001:db8:0:0:0:0:0:1/128"},
    "address v6 compressed": {"local_ip": "fe80::/10"},
    "macvlan": {"peer_pod": "localhost", "peer_intf": "eth0"},
    "uid bounds": {"uid": 4095},
    "uid zero": {"uid": 0},
    "15-char names": {"local_intf": "e" * 15, "peer_intf": "Ethernet1-1.100"},
    "dotted pod": {"peer_pod": "r2.core-1"},
    "mtu": {"mtu": 9000},
    "mtu bounds": {"mtu": 68},
}
BAD = {
    "uid -1": {"uid": -1},
    "uid 4096": {"uid": 4096},
    "uid string": {"uid": "1"},
    "16-char name": {"local_intf": "e" * 16},
    "name with a space": {"local_intf": "eth 1"},
    "name with a slash": {"peer_intf": "eth/1"},
    "name with a colon": {"local_intf": "eth1:0"},
    "name with a quote": {"local_intf": "eth'1"},
    "name with a hash": {"peer_intf": "eth#1"},
    "name with a backslash": {"local_intf": "eth\\1"},
    "empty name": {"local_intf": ""},
    "dot": {"local_intf": "."},
    "dot dot": {"peer_intf": ".."},
    "eth0 locally": {"local_intf": "eth0"},
    "upper-case pod": {"peer_pod": "R2"},
    "pod with a space": {"peer_pod": "r 2"},
    "ip without prefix": {"local_ip": "12.12.12.1"},
    "ip out of range": {"local_ip": "12.12.12.256/24"},
    "prefix too long": {"peer_ip": "12.12.12.2/33"},
    "v6 prefix too long": {"local_ip": "2001:db8::1/129"},
    "v6 triple colon": {"local_ip": "2001:::1/64"},
    "mtu too small": {"mtu": 67},
    "mtu too large": {"mtu": 65536},
    "unknown field": {"local_macaddr": "02:00:00:00:00:01"},
}

# Link-end fields (ours): the schema and the model must agree on each. The model refuses more (a
# rate above 1tbit, jitter without delay): what no schema keyword says is checked in test_model.py.
END_FIELDS = [
    ({"state": "down"}, True),
    ({"state": "up"}, True),
    ({"state": "off"}, False),
    ({"state": True}, False),
    ({"local_mac": "02:00:00:00:00:01"}, True),
    ({"local_mac": "02:AA:bb:00:00:01"}, True),
    ({"local_mac": "01:00:5e:00:00:01"}, False),
    ({"local_mac": "00:00:00:00:00:00"}, False),
    ({"local_mac": "02-00-00-00-00-01"}, False),
    ({"local_mac": "02:00:00:00:00"}, False),
    ({"local_ips": ["10.1.1.1/24", "2001:db8::1/64"]}, True),
    ({"local_ips": []}, True),
    ({"local_ips": ["10.1.1.1"]}, False),
    ({"local_ips": "10.1.1.1/24"}, False),
    ({"local_ips": ["2001:::1/64"]}, False),
    ({"impairments": {"delay": "20ms", "jitter": "2ms", "loss": "1%", "rate": "10mbit"}}, True),
    ({"impairments": {"delay": "1.5ms", "jitter": "100us", "delay_correlation": "25%", "distribution": "normal"}},
     True),
    ({"impairments": {"delay": "1s"}}, True),
    ({"impairments": {"rate": "8kbit"}}, True),
    ({"impairments": {"rate": "1.5gbit"}}, True),
    ({"impairments": {"rate": "125kbps"}}, True),
    ({"impairments": {"loss": "100%", "corrupt": "0.1%", "duplicate": "0.5%"}}, True),
    ({"impairments": {"delay": "10ms", "reorder": "25%", "reorder_correlation": "50%"}}, True),
    ({"impairments": {"loss": "5%", "loss_correlation": "25%"}}, True),
    ({"impairments": {}}, True),
    ({"impairments": {"delay": "-5ms"}}, False),
    ({"impairments": {"delay": "20"}}, False),
    ({"impairments": {"delay": "20 ms"}}, False),
    ({"impairments": {"delay": "20min"}}, False),
    ({"impairments": {"delay": 20}}, False),
    ({"impairments": {"loss": "101%"}}, False),
    ({"impairments": {"loss": "100.5%"}}, False),
    ({"impairments": {"loss": "1"}}, False),
    ({"impairments": {"loss": "-1%"}}, False),
    ({"impairments": {"rate": "0mbit"}}, False),
    ({"impairments": {"rate": "0.0mbit"}}, False),
    ({"impairments": {"rate": "10"}}, False),
    ({"impairments": {"rate": "10furlongs"}}, False),
    ({"impairments": {"delay": "10ms", "jitter": "1ms", "distribution": "gaussian"}}, False),
    ({"impairments": {"bandwidth": "10mbit"}}, False),
    ({"impairments": "20ms"}, False),
]


@pytest.mark.parametrize("link", GOOD.values(), ids=GOOD.keys())
def test_crd_accepts(rendered: dict[str, list[dict[str, Any]]], link: dict[str, Any]) -> None:
    assert topology_problems(crd_schema(rendered["base"]), _topology(**link)) == []


@pytest.mark.parametrize("link", BAD.values(), ids=BAD.keys())
def test_crd_rejects(rendered: dict[str, list[dict[str, Any]]], link: dict[str, Any]) -> None:
    assert topology_problems(crd_schema(rendered["base"]), _topology(**link)) != []


@pytest.mark.parametrize(("link", "valid"), END_FIELDS, ids=[str(c[0]) for c in END_FIELDS])
def test_crd_and_model_agree_on_link_end_fields(rendered: dict[str, list[dict[str, Any]]], link: dict[str, Any],
                                                 valid: bool) -> None:
    from meshnet.model import ManifestError, parse_topology

    topology = _topology(**link)
    schema_ok = topology_problems(crd_schema(rendered["base"]), topology) == []
    try:
        parse_topology(topology, "corpus")
        model_ok = True
    except ManifestError:
        model_ok = False
    assert (schema_ok, model_ok) == (valid, valid)


@pytest.mark.parametrize("field", ["uid", "peer_pod", "local_intf", "peer_intf"])
def test_crd_rejects_a_missing_required_field(rendered: dict[str, list[dict[str, Any]]], field: str) -> None:
    topology = _topology()
    del topology["spec"]["links"][0][field]
    problems = topology_problems(crd_schema(rendered["base"]), topology)
    assert any(f"'{field}' is a required property" in p for p in problems)


def test_crd_rejects_duplicate_uids(rendered: dict[str, list[dict[str, Any]]]) -> None:
    schema = crd_schema(rendered["base"])
    topology = _topology()
    topology["spec"]["links"].append({**topology["spec"]["links"][0], "local_intf": "eth2"})
    assert topology_problems(schema, topology) == ["spec.links: duplicate uid 1"]
    links = schema["properties"]["spec"]["properties"]["links"]
    assert (links["x-kubernetes-list-type"], links["x-kubernetes-list-map-keys"]) == ("map", ["uid"])


def test_crd_accepts_the_status_meshnetd_writes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    topology = _topology()
    topology["status"] = {
        "src_ip": "172.18.0.3", "net_ns": "/var/run/netns/cni-1234", "container_id": "abc", "node": "kind-worker",
        "skipped": [{"pod_name": "r2", "link_id": 1}],
        "links": [{"uid": 1, "kind": "vxlan", "state": "up", "message": "", "vni": 5001}],
        "plumbing_error": "",
    }
    assert topology_problems(crd_schema(rendered["base"]), topology) == []


def test_the_crd_declares_every_status_field_meshnetd_writes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """An API server prunes status fields its schema does not declare: a missing one (say, the
    VNI block) would be dropped silently on every write."""
    from meshnet.model import Impairments, LinkStatus, Skip, TopologyStatus

    in_force = LinkStatus(1, "vxlan", "up", "m", "eth1", "down", Impairments(rate=10_000_000), ("delay", "loss"))
    full = TopologyStatus(src_ip="172.18.0.3", net_ns="/var/run/netns/x", container_id="c", node="n",
                          skipped=(Skip("r2", 1),), links=(in_force,),
                          plumbing_error="e", vni_block=220).to_api()
    declared = crd_schema(rendered["base"])["properties"]["status"]["properties"]
    assert set(full) <= set(declared), set(full) - set(declared)
    assert set(full["links"][0]) <= set(declared["links"]["items"]["properties"])
    topology = _topology()
    topology["status"] = full
    assert topology_problems(crd_schema(rendered["base"]), topology) == []


# --- RBAC and the DaemonSet --------------------------------------------------------------------


def test_rbac_is_least_privilege(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["base"]
    rules = only(objects, "ClusterRole")["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # Read Topologies, write only their status: a node cannot change any pod's links (issue 12).
    assert granted == {("networkop.co.uk", "topologies", v) for v in ("get", "list", "watch")} | {
        ("networkop.co.uk", "topologies/status", v) for v in ("update", "patch")}
    binding = only(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == only(objects, "ClusterRole")["metadata"]["name"]
    sa = only(objects, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "meshnet"}]
    assert only(objects, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_daemonset(rendered: dict[str, list[dict[str, Any]]]) -> None:
    ds = only(rendered["base"], "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}  # any architecture
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (init,) = pod["initContainers"]
    assert init["command"] == ["meshnetctl", "install-cni"]
    (daemon,) = pod["containers"]
    assert daemon["name"] == "meshnetd" and daemon["securityContext"]["privileged"] is True
    env = {e["name"]: e["value"] if "value" in e else e["valueFrom"]["fieldRef"]["fieldPath"] for e in daemon["env"]}
    # MACVLAN_PARENTS empty: no macvlan unless the operator (or an overlay) says.
    assert env == {"HOST_IP": "status.hostIP", "NODE_NAME": "spec.nodeName", "GRPC_PORT": "51111",
                   "MESHNET_STORE": "kube", "MESHNET_TLS_CA": "/etc/meshnet/tls/ca.crt",
                   "MESHNET_TLS_CERT": "/etc/meshnet/tls/{node}.crt", "MESHNET_TLS_KEY": "/etc/meshnet/tls/{node}.key",
                   "MACVLAN_PARENTS": "", "MESHNET_TOPOLOGY_INDEX": DEFAULT_INDEX}
    assert daemon["ports"] == [{"name": "grpc", "containerPort": 51111, "hostPort": 51111, "protocol": "TCP"}]
    assert daemon["livenessProbe"]["tcpSocket"]["port"] == 51111
    assert daemon["readinessProbe"]["exec"]["command"][:2] == ["meshnetctl", "health"]
    assert daemon["resources"]["requests"]["memory"] and daemon["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m for m in daemon["volumeMounts"]}
    assert {"/etc/cni/net.d", "/opt/cni/bin", "/var/run/netns", "/run/meshnet"} <= set(mounts)
    assert mounts["/var/run/netns"]["mountPropagation"] == "Bidirectional"
    assert "--socket=/run/meshnet/meshnet.sock" in daemon["readinessProbe"]["exec"]["command"]
    assert all(c["image"] == "meshnet/meshnet:latest" for c in [init, daemon])


def test_peers_use_the_mounted_certificates(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The Secret `python -m meshnet.pki --secret` makes, mounted read-only where the env points,
    and parsed by meshnetd as its TLS configuration (so the names match in both places)."""
    from meshnet import pki
    from meshnet.daemon.config import TlsPaths, parse_args

    for target in TARGETS:
        pod = only(rendered[target], "DaemonSet")["spec"]["template"]["spec"]
        (daemon,) = pod["containers"]
        mount = next(m for m in daemon["volumeMounts"] if m["name"] == "tls")
        volume = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == pki.SECRET_NAME and mount["readOnly"] is True
        assert volume["secret"]["defaultMode"] == 0o400
        env = {e["name"]: e["value"] for e in daemon["env"] if "value" in e}
        cfg = parse_args([], env={**env, "NODE_NAME": "kind-worker"})
        assert cfg.tls == TlsPaths(f"{mount['mountPath']}/{pki.CA_CERT}", f"{mount['mountPath']}/kind-worker.crt",
                                   f"{mount['mountPath']}/kind-worker.key")
        assert cfg.grpc_bind == ""  # the VTEP (HOST_IP): where the liveness probe and the peers connect


@pytest.mark.parametrize(("target", "parents"), [("base", ()), ("overlays/kind", ("eth0",))])
def test_macvlan_parents_per_distribution(rendered: dict[str, list[dict[str, Any]]], target: str,
                                          parents: tuple[str, ...]) -> None:
    """kind's only interface is its underlay: the overlay names it so tests/macvlan.yml works there."""
    from meshnet.daemon.config import parse_args

    (daemon,) = only(rendered[target], "DaemonSet")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in daemon["env"] if "value" in e}
    assert [e["name"] for e in daemon["env"]].count("MACVLAN_PARENTS") == 1
    assert parse_args([], env=env).macvlan_parents == parents


def install_cni_args(ds: dict[str, Any]) -> dict[str, str]:
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in init["args"])
    assert len(args) == len(init["args"]), "every install-cni argument is --name=value, once"
    return args


@pytest.mark.parametrize("target", TARGETS)
def test_cni_directories_are_the_hosts_at_the_same_path(rendered: dict[str, list[dict[str, Any]]], target: str) -> None:
    """The runtime hands meshnet host paths (CNI_PATH, netns): every host directory is mounted at
    its own path, and install-cni writes where the volumes are."""
    ds = only(rendered[target], "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    for container in [*pod["initContainers"], *pod["containers"]]:
        for mount in container["volumeMounts"]:
            if mount["name"] == "tls":
                continue  # the TLS Secret: not a host directory
            assert mount["mountPath"] == host_paths[mount["name"]], f"{container['name']}: {mount['name']}"
    args = install_cni_args(ds)
    assert args["conf-dir"] == host_paths["cni-conf"]
    assert args["bin-dir"] == host_paths["cni-bin"]
    assert args["log-file"].startswith(host_paths["cni-log"] + "/")


def test_overlays(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def host_paths(target: str) -> dict[str, str]:
        pod = only(rendered[target], "DaemonSet")["spec"]["template"]["spec"]
        return {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}

    assert host_paths("overlays/kops")["cni-bin"] == "/home/kubernetes/bin"
    k3s = host_paths("overlays/k3s")
    assert k3s["cni-conf"] == "/var/lib/rancher/k3s/agent/etc/cni/net.d"
    assert k3s["cni-bin"] == "/var/lib/rancher/k3s/data/cni"
    assert install_cni_args(only(rendered["overlays/chained"], "DaemonSet"))["mode"] == "chain"
    for target in TARGETS:
        expected = "chain" if target == "overlays/chained" else "delegate"
        assert install_cni_args(only(rendered[target], "DaemonSet"))["mode"] == expected, target


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_pin_the_project_version(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    pod = only(rendered[f"overlays/{overlay}"], "DaemonSet")["spec"]["template"]["spec"]
    images = {c["image"] for c in [*pod["initContainers"], *pod["containers"]]}
    assert images == {f"meshnet/meshnet:{VERSION}"}


def test_kind_cluster_config() -> None:
    config = yaml.safe_load((MANIFESTS / "overlays" / "kind" / "cluster.yaml").read_text())
    assert [n["role"] for n in config["nodes"]] == ["control-plane", "worker", "worker", "worker"]


def test_daemonset_args_drive_install_cni(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The init container's arguments, re-rooted in a temporary host, work with meshnetctl."""
    from meshnet import cli

    args = install_cni_args(only(rendered["base"], "DaemonSet"))
    host = tmp_path / "host"
    conf_dir, bin_dir = host / args["conf-dir"].lstrip("/"), host / args["bin-dir"].lstrip("/")
    conf_dir.mkdir(parents=True)
    (conf_dir / "10-kindnet.conflist").write_text(
        (ROOT / "tests/fixtures/cni-configs/kindnet/10-kindnet.conflist").read_text())
    binary = tmp_path / "meshnet"
    binary.write_bytes(b"#!/bin/sh\n")
    argv = ["install-cni", f"--conf-dir={conf_dir}", f"--bin-dir={bin_dir}", f"--binary={binary}",
            f"--mode={args['mode']}", f"--log-file={args['log-file']}", f"--wait={args['wait']}"]
    assert cli.main(argv) == 0
    written = json.loads((conf_dir / "00-meshnet.conflist").read_text())
    assert written["plugins"][0]["log_file"] == args["log-file"]
    assert (bin_dir / "meshnet").read_bytes() == b"#!/bin/sh\n"


def test_crd_address_pattern_agrees_with_ipaddress(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The CIDR pattern accepts what Python's ipaddress (meshnet's model) accepts, in the forms
    people write: compressed and exploded IPv6, every prefix length."""
    import ipaddress
    import random

    link = crd_schema(rendered["base"])["properties"]["spec"]["properties"]["links"]["items"]
    pattern = re.compile(link["properties"]["local_ip"]["pattern"])
    rng = random.Random(4789)
    for _ in range(500):
        v4 = ipaddress.IPv4Address(rng.getrandbits(32))
        v6 = ipaddress.IPv6Address(rng.getrandbits(128) & ~(0xFFFF << rng.choice([0, 32, 64])))
        for text in (f"{v4}/{rng.randint(0, 32)}", f"{v6}/{rng.randint(0, 128)}",
                     f"{v6.exploded}/{rng.randint(0, 128)}", f"{str(v6).upper()}/64"):
            ipaddress.ip_interface(text)  # valid by construction
            assert pattern.match(text), text
    for text in ["1.2.3/24", "1.2.3.4.5/24", "01.2.3.4/8x", "::1::/64", "2001:db8::g/64", "1:2:3:4:5:6:7:8:9/64",
                 "12.12.12.1/24 ", "/24", "2001:db8::1"]:
        assert not pattern.match(text), text


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    """Docker does not run here: check the build context by construction instead."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*", "the context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = [m.group(1).split()[:-1] for m in re.finditer(r"^COPY (?!--from)(.+)$", dockerfile, re.M)]
    sources = {src.rstrip("/") for srcs in copied for src in srcs}
    assert sources and sources <= allowed, sources - allowed
    for src in sources:
        assert (ROOT / src).exists(), src
    assert re.search(r"^ENTRYPOINT \[\"meshnetd\"\]$", dockerfile, re.M)
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert len(stages) == 2 and stages[-1].startswith("python:3.11-slim"), stages
    # The DaemonSet's install-cni --binary is where the image puts the standalone build's link.
    assert "ln -sf /usr/local/lib/meshnet-cni/meshnet /usr/local/bin/meshnet" in dockerfile


# Bad manifests (tests/bad) whose fault lies between objects or links (a peer's interface, a uid
# reused by the peer, a link to itself): one Topology alone is valid, so only meshnet's model sees it.
CROSS_OBJECT = {"asymmetric-peer-intf.yml", "interface-twice.yml", "self-loop.yml", "uid-reused.yml"}
LINK_FIELDS = {"uid", "peer_pod", "local_intf", "peer_intf", "local_ip", "peer_ip", "mtu"}


def _expected_field(path: Path) -> str:
    return next(line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("# expect:"))


BAD_LINKS = sorted(p for p in ROOT.glob("tests/bad/*.yml")
                   if p.name not in CROSS_OBJECT
                   and (_expected_field(p) in LINK_FIELDS or _expected_field(p).startswith("unknown field")))


@pytest.mark.parametrize("path", BAD_LINKS, ids=lambda p: p.name)
def test_crd_rejects_the_bad_links_meshnet_rejects(rendered: dict[str, list[dict[str, Any]]], path: Path) -> None:
    schema = crd_schema(rendered["base"])
    topologies = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "Topology"]
    problems = [p for t in topologies for p in topology_problems(schema, t)]
    field = _expected_field(path).removeprefix("unknown field(s) ")
    assert any(field in p for p in problems), problems


@pytest.mark.parametrize("side", ["local_intf", "peer_intf"])
def test_crd_interface_names_follow_meshnets_rule(rendered: dict[str, list[dict[str, Any]]], side: str) -> None:
    """The CRD and meshnet.naming agree on every name of a corpus that covers each rule."""
    from meshnet import naming

    names = ["eth1", "e", "Ethernet1-1.100", "e" * 15, "e" * 16, "", ".", "..", ".eth1", "-force", "_x", "eth_1",
             "eth 1", "eth/1", "eth1:0", "eth'1", 'eth"1', "eth#1", "eth\\1", "eth;1", "$(x)", "`x`", "eth\n1",
             "eth\t1", "eth1\x7f", "ethé", "eth0", *sorted(naming._IP_KEYWORDS), "links", "upstream"]
    schema = crd_schema(rendered["base"])
    for name in names:
        crd_ok = topology_problems(schema, _topology(**{side: name})) == []
        meshnet_ok = naming.ifname_problem(name) is None and not (side == "local_intf" and name == "eth0")
        assert crd_ok == meshnet_ok, f"{side}={name!r}: CRD {'accepts' if crd_ok else 'rejects'} it, meshnet does not"


def test_the_daemon_needs_no_more_than_the_cluster_role_grants() -> None:
    """What meshnetd calls: the kube store's reads and its status replace. The store's apply and
    delete (create/replace/delete a Topology) are for `meshnetctl` with the user's credentials
    and the single-node mode's own store; the daemon never calls them."""
    daemon = "\n".join(p.read_text() for p in (ROOT / "meshnet" / "daemon").glob("*.py"))
    assert not re.search(r"store\.(apply|delete)\(", daemon)
    kube = (ROOT / "meshnet" / "store" / "kube.py").read_text()
    update_status = kube[kube.index("    def update_status("):]
    update_status = update_status[: update_status.index("\n    def ", 10)]
    calls = set(re.findall(r"self\._api\.(\w+)", update_status))
    assert calls <= {"get_namespaced_custom_object", "replace_namespaced_custom_object_status"}, calls
    link_states = kube[kube.index("    def update_link_states("):]
    link_states = link_states[: link_states.index("\n    def ", 10)]
    assert set(re.findall(r"self\._api\.(\w+)", link_states)) == {"patch_namespaced_custom_object_status"}
    assert "patch_namespaced_custom_object," not in kube  # the main resource (its spec) is never patched
    topo_kube = (ROOT / "meshnet" / "topo" / "kube.py").read_text()
    assert "load_kube_config" in topo_kube  # meshnetctl create/destroy: the user's kubeconfig


# --- status: the same corpus as the model (tests/bad/status, tests/test_status_corpus.py) -------

GOOD_STATUSES: list[dict[str, Any]] = [
    {},
    {"src_ip": "198.51.100.2", "net_ns": "/var/run/netns/cni-2", "container_id": "c0ffee", "node": "node1"},
    {"src_ip": "2001:db8::2", "net_ns": "/run/netns/netns-1f2e", "container_id": "a" * 64, "node": "kind-worker.x"},
    {"src_ip": "203.0.113.9", "net_ns": "/proc/2/ns/net", "container_id": "ID_1.x-y", "node": "n"},
    {"src_ip": "203.0.113.9", "net_ns": "/proc/4194304/ns/net", "container_id": "a" * 255, "node": "a" * 253},
    {"net_ns": "/var/run/netns/" + "a" * 63, "vni_block": 4000, "plumbing_error": "ip: RTNETLINK answers:\tbusy\n"},
    {"skipped": [{"pod_name": "r1", "link_id": 0}, {"pod_name": "r3.x", "link_id": 4095}], "vni_block": 1},
    {"links": [{"uid": 0, "kind": "", "state": "pending", "message": "peer pod r1 is not up yet"},
               {"uid": 4095, "kind": "vxlan", "state": "up", "intf": "e" * 15},
               {"uid": 2, "kind": "macvlan", "state": "error", "message": "x" * 4096, "intf": "eth0.1"},
               {"uid": 3, "kind": "veth", "state": "up", "intf": "", "vni": 5001}]},
]


def _status_topology(status: Any) -> dict[str, Any]:
    topology = _topology()
    topology["status"] = status
    return topology


@pytest.mark.parametrize("status", GOOD_STATUSES, ids=range(len(GOOD_STATUSES)))
def test_crd_and_model_accept_the_same_good_statuses(rendered: dict[str, list[dict[str, Any]]],
                                                     status: dict[str, Any]) -> None:
    from meshnet.model import TopologyStatus

    assert topology_problems(crd_schema(rendered["base"]), _status_topology(status)) == []
    parsed = TopologyStatus.from_api(status, "Topology default/r1")
    assert parsed.problems == ()


def test_crd_refuses_every_forged_status_the_model_refuses(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from meshnet.model import TopologyStatus
    from tests.test_status_corpus import FORGED

    schema = crd_schema(rendered["base"])
    for name, doc, expect in FORGED:
        assert TopologyStatus.from_api(doc["status"], "Topology default/r2").problems, name
        problems = topology_problems(schema, _status_topology(doc["status"]))
        assert problems, f"{name}: the CRD accepts what meshnet refuses ({expect})"
        assert all(p.startswith("status") for p in problems), (name, problems)


def test_status_address_pattern_agrees_with_the_model(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import ipaddress
    import random

    from meshnet.model import vtep_problem

    status = crd_schema(rendered["base"])["properties"]["status"]["properties"]
    pattern = re.compile(status["src_ip"]["pattern"].replace("$", r"\Z"))
    rng = random.Random(51111)
    for _ in range(300):
        v4 = ipaddress.IPv4Address(rng.getrandbits(32))
        v6 = ipaddress.IPv6Address(rng.getrandbits(128) & ~(0xFFFF << rng.choice([0, 32, 64])))
        for text in (str(v4), str(v6), v6.exploded, str(v6).upper()):
            assert vtep_problem(text) is None and pattern.search(text), text
    for text in ["1.2.3", "01.2.3.4", "1.2.3.4/32", "1.2.3.4\n", " 1.2.3.4", "::1::", "fe80::1%eth0", "-x", ""]:
        assert vtep_problem(text) is not None and not pattern.search(text), text
