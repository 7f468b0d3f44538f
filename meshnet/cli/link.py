"""`meshnetctl link set POD:INTF down|up [--delay ..] [--clear]`: change one link end of a running
topology, wherever meshnet runs. It edits the pod's Topology spec (the declared truth); the
daemons see the change and apply it in place (meshnet.ends.change_end), within a second.

- a cluster (default): the Topology is read and replaced with the user's kubeconfig, with its
  resourceVersion, so a concurrent edit is never overwritten (retried a few times);
- `--lab NAME`: the lab's store; `--store URL`: a standalone node's store.

Values are checked by the model, with the model's messages, before anything is written.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from meshnet.cli import output
from meshnet.model import GROUP, PLURAL, VERSION, ManifestError, Topology, parse_topology

IMPAIRMENT_FLAGS = ("delay", "jitter", "loss", "rate")
CONFLICT_RETRIES = 5


class LinkEditError(Exception):
    """The end cannot be edited (no such Topology or interface, store or API failure)."""


def edit_end(raw: dict[str, Any], intf: str, *, state: str = "", clear: bool = False,
             impairments: dict[str, str] | None = None, source: str = "") -> tuple[dict[str, Any], Topology]:
    """The Topology `raw` (API form) with its end `intf` changed, and that Topology as the model
    reads it (ManifestError names the object, link and field of a bad value). `clear` drops the
    end's impairments before `impairments` are merged in."""
    new = copy.deepcopy(raw)
    links = new.get("spec", {}).get("links") or []
    link = next((lnk for lnk in links if isinstance(lnk, dict) and lnk.get("local_intf") == intf), None)
    meta = new.get("metadata", {})
    if link is None:
        raise LinkEditError(f"Topology {meta.get('namespace', 'default')}/{meta.get('name')} has no link "
                            f"with local_intf {intf}")
    if state:
        link["state"] = state
    if clear:
        link.pop("impairments", None)
    if impairments:
        link["impairments"] = {**(link.get("impairments") or {}), **impairments}
    return new, parse_topology(new, source)


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    impairments = {k: getattr(args, k) for k in IMPAIRMENT_FLAGS if getattr(args, k) is not None}
    return {"state": args.state or "", "clear": args.clear, "impairments": impairments}


def _set_in_store(url: str, namespace: str, pod: str, intf: str, changes: dict[str, Any]) -> Topology:
    from meshnet.store import open_store

    store = open_store(url)
    try:
        topo = store.get(namespace, pod)
        if topo is None:
            raise LinkEditError(f"no Topology {namespace}/{pod} in {url.split('?')[0]}")
        _, new = edit_end(topo.to_api(), intf, source=f"Topology {namespace}/{pod}", **changes)
        return store.apply(new)
    finally:
        store.close()


def _set_in_cluster(kubeconfig: str, namespace: str, pod: str, intf: str, changes: dict[str, Any]) -> Topology:
    import kubernetes

    from meshnet.topo.kube import REQUEST_TIMEOUT, api_client

    custom = kubernetes.client.CustomObjectsApi(api_client(kubeconfig or None))
    what = f"Topology {namespace}/{pod}"
    for _ in range(CONFLICT_RETRIES):
        try:
            got: Any = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pod,
                                                           _request_timeout=REQUEST_TIMEOUT)
        except kubernetes.client.exceptions.ApiException as e:
            raise LinkEditError(f"get {what}: API server answered {e.status}: {e.reason}") from e
        body, new = edit_end(got, intf, source=what, **changes)
        body.pop("status", None)  # the spec is ours to change; the status is the daemons'
        try:
            custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pod, body,
                                                    _request_timeout=REQUEST_TIMEOUT)
            return new
        except kubernetes.client.exceptions.ApiException as e:
            if e.status != 409:  # 409: edited meanwhile (resourceVersion): read it again
                raise LinkEditError(f"replace {what}: API server answered {e.status}: {e.reason}") from e
    raise LinkEditError(f"replace {what}: edited concurrently {CONFLICT_RETRIES} times; try again")


def _cmd_link_set(args: argparse.Namespace) -> int:
    pod, sep, intf = args.end.partition(":")
    if not sep or not pod or not intf:
        return output.fail("link set", f"{args.end!r}: expected POD:INTF, e.g. r1:eth1")
    changes = _changes(args)
    if not changes["state"] and not changes["clear"] and not changes["impairments"]:
        return output.fail("link set", "nothing to change: give up|down, --clear or an impairment")
    try:
        if args.lab:
            from meshnet.lab.cluster import Lab

            url = Lab(args.lab).state.store_url
            topo = _set_in_store(url, args.namespace, pod, intf, changes)
        elif args.store:
            topo = _set_in_store(args.store, args.namespace, pod, intf, changes)
        else:
            topo = _set_in_cluster(args.kubeconfig, args.namespace, pod, intf, changes)
    except ManifestError as e:
        output.problems("meshnetctl link set: refused", e.problems)
        return 1
    except Exception as e:  # store, lab or API failure: one line naming it
        return output.fail("link set", e)
    link = next(lnk for lnk in topo.links if lnk.local_intf == intf)
    shaped = ", ".join(f"{k} {v}" for k, v in link.impairments.to_api().items()) if link.impairments else "none"
    print(f"{topo.namespace}/{topo.name}:{intf} (link uid {link.uid}): state {link.state}, impairments {shaped}")
    return 0


def add_parsers(sub: Any) -> None:
    """Register `link set` on meshnetctl's subparsers."""
    link = sub.add_parser("link", help="change one link end of running pods (state, impairments)")
    lsub = link.add_subparsers(dest="link_command", required=True, metavar="LINK_COMMAND")
    p = lsub.add_parser("set", help="set a link end down|up, add impairments or clear them")
    p.add_argument("end", help="POD:INTF, the pod's interface of the link")
    p.add_argument("state", nargs="?", choices=("up", "down"), help="administrative state")
    p.add_argument("--delay", help="added one-way latency, e.g. 20ms")
    p.add_argument("--jitter", help="delay variation, e.g. 2ms (needs a delay)")
    p.add_argument("--loss", help="random loss, e.g. 1%%")
    p.add_argument("--rate", help="bandwidth limit, e.g. 10mbit")
    p.add_argument("--clear", action="store_true", help="remove the end's impairments (before any given here)")
    p.add_argument("-n", "--namespace", default="default", help="the pod's namespace; default default")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--lab", default="", help="a lab by name (its store)")
    where.add_argument("--store", default="", help="a standalone store URL, e.g. sqlite:///var/lib/meshnet/store.db")
    where.add_argument("--kubeconfig", default="", help="the cluster (default: $KUBECONFIG, ~/.kube/config)")
    p.set_defaults(func=_cmd_link_set)
