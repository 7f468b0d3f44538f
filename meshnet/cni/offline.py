"""What the shim does by itself when meshnetd cannot be reached (issue 13).

- DEL always completes: in delegate mode the shim runs the delegate's DEL from the config and the
  prevResult the runtime passed; chained, it answers success so the runtime goes on to the other
  plugins' DEL. meshnet's own interfaces die with the pod's namespace; the far ends are left to
  the peers' reconcilers.
- ADD of a pod the node's topology index does not list (written by meshnetd, see
  ``meshnet.daemon.topo_index``) gets its eth0 and success, and leaves a record of the sandbox so
  that meshnetd, once back, builds its links if a Topology for it appears. A pod the index lists,
  or any pod while the index is missing or damaged, still gets error 11.

Standard library only, and imported by the shim only on that path: the happy path never pays for it.
The index is untrusted input (a file on disk): bounded in size, parsed strictly, names validated.
"""

from __future__ import annotations

import os

from meshnet.cni import protocol
from meshnet.cni import wirejson as json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any

INDEX_FORMAT = 1
DEFAULT_INDEX = "/run/meshnet/topologies.json"
# ~100 bytes a Topology: room for tens of thousands, and a bound on what a damaged file costs us.
MAX_INDEX_BYTES = 8 << 20
MAX_RECORD_BYTES = 4096
MAX_CONTAINER_ID = 200  # record file names are container ids: keep them well inside NAME_MAX
DEFAULT_CNI_PATH = "/opt/cni/bin:/usr/lib/cni"

_LOWER_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


class IndexUnavailable(Exception):
    """The index is missing, unreadable or damaged: whether a pod has a Topology is unknown."""


def _label_ok(value: str) -> bool:
    # DNS-1123 label, without `re` (an import the shim avoids).
    return (0 < len(value) <= 63 and value[0] in _LOWER_ALNUM and value[-1] in _LOWER_ALNUM
            and all(c in _LOWER_ALNUM or c == "-" for c in value))


def k8s_name_ok(value: object, *, label: bool = False) -> bool:
    """A DNS-1123 label (namespaces) or subdomain (object names), as naming.k8s_name_problem has them."""
    if not isinstance(value, str):
        return False
    if label:
        return _label_ok(value)
    return 0 < len(value) <= 253 and all(_label_ok(part) for part in value.split("."))


def pending_dir(index_path: str) -> str:
    """Where the shim leaves records of pods it started without meshnetd: beside the index."""
    return os.path.splitext(index_path)[0] + ".pending"


def format_index(keys: Iterable[tuple[str, str]], generation: int, written: float) -> bytes:
    """The index file's bytes (meshnetd writes it): sorted "namespace/name" entries."""
    entries = sorted(f"{ns}/{name}" for ns, name in keys)
    doc = {"format": INDEX_FORMAT, "generation": generation, "written": round(written, 3), "topologies": entries}
    return (json.dumps(doc) + "\n").encode()


def parse_index(raw: bytes) -> frozenset[tuple[str, str]]:
    """The (namespace, name) pairs of an index file's bytes; IndexUnavailable for anything else."""
    if len(raw) > MAX_INDEX_BYTES:
        raise IndexUnavailable(f"larger than {MAX_INDEX_BYTES} bytes")
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise IndexUnavailable(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise IndexUnavailable(f"not a topology index of format {INDEX_FORMAT}")
    generation = doc.get("generation")
    entries = doc.get("topologies")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        raise IndexUnavailable("'generation' must be a non-negative integer")
    if not isinstance(entries, list):
        raise IndexUnavailable("'topologies' must be a list")
    keys = set()
    for entry in entries:
        ns, sep, name = entry.partition("/") if isinstance(entry, str) else ("", "", "")
        if not sep or not k8s_name_ok(ns, label=True) or not k8s_name_ok(name):
            raise IndexUnavailable(f"entry {str(entry)[:80]!r} is not 'namespace/name'")
        keys.add((ns, name))
    return frozenset(keys)


def read_index(path: str) -> frozenset[tuple[str, str]]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise IndexUnavailable(exc.strerror or str(exc)) from exc
    return parse_index(raw)


class Record:
    """A sandbox the shim set up without meshnetd (a pod without a Topology at that time)."""

    __slots__ = ("container_id", "ifname", "namespace", "netns", "pod")

    def __init__(self, container_id: str, namespace: str, pod: str, netns: str, ifname: str) -> None:
        self.container_id = container_id
        self.namespace = namespace
        self.pod = pod
        self.netns = netns
        self.ifname = ifname

    def to_dict(self) -> dict[str, str]:
        return {"container_id": self.container_id, "namespace": self.namespace, "pod": self.pod,
                "netns": self.netns, "ifname": self.ifname}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().values()))

    def __repr__(self) -> str:
        return f"Record({self.to_dict()!r})"


def container_id_ok(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_CONTAINER_ID and protocol._valid_container_id(value)


def _ifname_ok(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 15 and value not in (".", "..") and \
        not protocol._bad_ifname_char(value)


def parse_record(raw: bytes, container_id: str) -> Record:
    """A record file's bytes (named after ``container_id``); ValueError names what is wrong."""
    if len(raw) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
    doc = json.loads(raw.decode())
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    # Checked field by field below: until then they are whatever the file holds.
    fields: list[Any] = [doc.get(k) for k in ("container_id", "namespace", "pod", "netns", "ifname")]
    rec = Record(*fields)
    if rec.container_id != container_id or not container_id_ok(rec.container_id):
        raise ValueError(f"container_id {str(rec.container_id)[:80]!r} does not match the file name")
    if not k8s_name_ok(rec.namespace, label=True) or not k8s_name_ok(rec.pod):
        raise ValueError(f"pod {str(rec.namespace)[:70]!r}/{str(rec.pod)[:260]!r} is not a valid name")
    if not isinstance(rec.netns, str) or not rec.netns.startswith("/") or "\0" in rec.netns or len(rec.netns) > 1024:
        raise ValueError(f"netns {str(rec.netns)[:80]!r} is not an absolute path")
    if not _ifname_ok(rec.ifname):
        raise ValueError(f"ifname {str(rec.ifname)[:20]!r} is not an interface name")
    return rec


def record_path(index_path: str, container_id: str) -> str:
    return os.path.join(pending_dir(index_path), container_id + ".json")


def write_record(index_path: str, rec: Record) -> None:
    """Atomically (tmp file + rename): meshnetd never reads half a record."""
    if not container_id_ok(rec.container_id):
        raise OSError(f"container id {rec.container_id[:80]!r} cannot name a record file")
    directory = pending_dir(index_path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    final = record_path(index_path, rec.container_id)
    tmp = f"{final}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(rec.to_dict()))
    os.replace(tmp, final)


def remove_record(index_path: str, container_id: str) -> bool:
    """True if there was one."""
    if not container_id_ok(container_id):
        return False
    try:
        os.unlink(record_path(index_path, container_id))
    except FileNotFoundError:
        return False
    return True


def read_records(index_path: str) -> tuple[list[Record], list[tuple[str, str]]]:
    """(valid records, [(file, why)] of damaged ones) in the pending directory (missing: none)."""
    directory = pending_dir(index_path)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return [], []
    good: list[Record] = []
    bad: list[tuple[str, str]] = []
    for name in names:
        if not name.endswith(".json"):
            continue  # a writer's tmp file
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                good.append(parse_record(f.read(MAX_RECORD_BYTES + 1), name[:-5]))
        except (OSError, ValueError) as exc:
            bad.append((name, str(exc)))
    return good, bad


# ---------------------------------------------------------------------------------------------
# The shim's answers without meshnetd


def _pod(req: protocol.CniRequest) -> tuple[str, str]:
    """(namespace, pod) from CNI_ARGS, validated as meshnetd does ("" pod: not a Kubernetes pod)."""
    pod = req.pod_name or ""
    namespace = req.pod_namespace or "default"  # podman passes no namespace
    if not pod:
        return namespace, ""
    for value, what, label in ((pod, "K8S_POD_NAME", False), (namespace, "K8S_POD_NAMESPACE", True)):
        if not k8s_name_ok(value, label=label):
            raise protocol.CniError(protocol.INVALID_ENV, f"CNI_ARGS {what} is invalid",
                                    f"{value[:80]!r} is not a valid name")
    return namespace, pod


def index_path(conf: protocol.NetConf) -> str:
    value = conf.raw.get("topology_index")
    if value is not None and (not isinstance(value, str) or not value.startswith("/")):
        raise protocol.CniError(protocol.INVALID_NETWORK_CONFIG, "invalid network config: 'topology_index' must be "
                            "an absolute path", f"got {value!r}"[:120])
    return value or DEFAULT_INDEX


def _delegate_env(req: protocol.CniRequest, env: Mapping[str, str], command: str) -> dict[str, str]:
    out = {k: env[k] for k in protocol.ENV_VARS if k in env}
    out.update(CNI_COMMAND=command, CNI_IFNAME=req.ifname or "eth0",
               CNI_PATH=":".join(req.path) or DEFAULT_CNI_PATH)
    return out


def _run_delegate(req: protocol.CniRequest, env: Mapping[str, str], command: str,
                  prev: dict[str, Any] | None) -> dict[str, Any] | None:
    from meshnet.cni import delegate  # subprocess and result conversion: only this path pays for them

    conf = req.conf
    assert conf.delegate is not None
    runtime = conf.raw.get("runtimeConfig")
    return delegate.run_delegate(conf.delegate, command, _delegate_env(req, env, command), conf.cni_version,
                                 conf.name, prev_result=prev,
                                 runtime_config=runtime if isinstance(runtime, dict) else None)


def serve(req: protocol.CniRequest, env: Mapping[str, str], cause: protocol.CniError,
          log: Callable[..., None]) -> dict[str, Any] | None:
    """ADD or DEL without meshnetd (``cause`` says why it is unreachable); the result, or CniError."""
    namespace, pod = _pod(req)
    path = index_path(req.conf)
    who = f"{namespace}/{pod}" if pod else "(no K8S_POD_NAME)"
    if req.command == "DEL":
        _delete(req, env, path, namespace, pod, cause, log)
        return None
    if req.command != "ADD":
        raise cause
    try:
        listed = read_index(path)
    except IndexUnavailable as exc:
        raise protocol.CniError(cause.code, cause.msg, f"{cause.details}; topology index {path}: {exc}") from cause
    if pod and (namespace, pod) in listed:
        raise protocol.CniError(cause.code, cause.msg, f"{cause.details}; pod {who} has a Topology "
                                                   f"(topology index {path})") from cause
    if req.conf.delegate is not None:
        result = _run_delegate(req, env, "ADD", None)
    else:
        from meshnet.cni import delegate

        result = delegate.chained_prev_result(req.conf, "ADD")
    if pod:
        try:
            write_record(path, Record(req.container_id, namespace, pod, req.netns, req.ifname))
        except OSError as exc:
            # The pod runs with eth0 anyway; only a Topology made for it later would not be applied.
            log(level="warning", event="pending-record-failed", container_id=req.container_id, error=str(exc))
    log(level="warning", event="add-without-meshnetd", container_id=req.container_id, pod=who,
        reason=str(cause), msg="no Topology in the topology index: eth0 only; meshnetd applies one made later")
    return result


def _delete(req: protocol.CniRequest, env: Mapping[str, str], path: str, namespace: str, pod: str,
            cause: protocol.CniError, log: Callable[..., None]) -> None:
    try:
        remove_record(path, req.container_id)
    except OSError as exc:  # a record left behind is dropped by meshnetd once the netns is gone
        log(level="warning", event="pending-record-left", container_id=req.container_id, error=str(exc))
    mode = "chained"
    if req.conf.delegate is not None:
        from meshnet.cni import delegate

        mode = "delegate"
        prev = delegate.delegate_part(req.conf.prev_result, namespace, pod)
        _run_delegate(req, env, "DEL", prev)
    log(level="warning", event="del-without-meshnetd", container_id=req.container_id, mode=mode,
        pod=f"{namespace}/{pod}" if pod else "", reason=str(cause),
        msg="meshnet's interfaces go with the pod's namespace; peers' reconcilers remove the far ends")
