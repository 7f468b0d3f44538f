"""`meshnetctl lab ...`: the emulated cluster (meshnet.lab) from the command line (root)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from meshnet.cli import output
from meshnet.model import ManifestError

if TYPE_CHECKING:
    from meshnet.lab.cluster import Lab


def _lab(args: argparse.Namespace, *, quiet: bool = False) -> Lab:
    from meshnet.lab.cluster import Lab

    return Lab(args.name, progress=None if quiet else output.to_stderr)


def _print_connectivity(results: list[dict[str, Any]]) -> bool:
    if not results:
        print("no addressed links to ping")
        return True
    output.table([[r["from"], r["to"], r["address"], "ok" if r["ok"] else "FAIL"] for r in results],
                 ["FROM", "TO", "ADDRESS", "PING"])
    good = sum(r["ok"] for r in results)
    print(f"{good}/{len(results)} link ends answer")
    return good == len(results)


def _cmd_up(args: argparse.Namespace) -> int:
    from meshnet.lab.state import LabError

    lab = _lab(args)
    try:
        cni_bin = [args.cni_bin] if args.cni_bin else None
        summary = lab.up(args.file, args.nodes, store=args.store, kubeconfig=args.kubeconfig, cni_bin=cni_bin,
                         raise_neigh_limits=args.raise_neigh_limits)
    except (LabError, ManifestError) as e:
        output.fail("lab up", e)
        if not isinstance(e, ManifestError) and lab.exists():
            output.to_stderr(f"the lab is partly up; remove it with: meshnetctl lab down --name {args.name}")
        return 1
    per_node = ", ".join(f"{n}: {c}" for n, c in sorted(summary["pods_per_node"].items()))
    kinds = ", ".join(f"{k}: {c}" for k, c in sorted(summary["links_up_by_kind"].items())) or "none"
    print(f"lab {summary['lab']} up in {summary['seconds']:.2f}s")
    print(f"  pods per node: {per_node}")
    print(f"  links up: {kinds} (of {summary['links_total']} in the topology)")
    ok = not summary["failed"]
    for pod, err in sorted(summary["failed"].items()):
        print(f"  FAILED {pod}: {err}")
    if args.routes:
        from meshnet.executor import ExecError
        from meshnet.topo.routes import RouteError, install_routes

        try:
            routed = install_routes(lab)
            print(f"  routed: {routed['routes']} static routes, {routed['loopbacks']} loopbacks, {routed['pods']} pods")
        except (RouteError, ExecError, ManifestError) as e:
            print(f"  ROUTES FAILED: {e}")
            ok = False
    if args.ping:
        print("connectivity (each addressed link end pinged from its peer):")
        ok = _print_connectivity(lab.connectivity()) and ok
    first = next(iter(lab.state.pods), "POD")
    print("explore it:")
    print(f"  {output.prog()} lab exec --name {args.name} {first} -- ip -br addr")
    print(f"  {output.prog()} lab status --name {args.name}")
    print(f"  {output.prog()} lab down --name {args.name}")
    return 0 if ok else 1


def _cmd_apply(args: argparse.Namespace) -> int:
    from meshnet.lab.state import LabError

    try:
        result = _lab(args).apply(args.file)
    except (LabError, ManifestError) as e:
        return output.fail("lab apply", e)
    for what, names in result.items():
        if names:
            print(f"{what.replace('_', ' ')}: {', '.join(names)}")
    if not any(result.values()):
        print("nothing changed")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    for p in _lab(args).down():
        output.to_stderr(f"warning: {p}")
    print(f"lab {args.name} removed")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from meshnet.lab.state import LabError

    try:
        status = _lab(args, quiet=True).status()
    except LabError as e:
        return output.fail("lab status", e)
    if args.json:
        output.print_json(status, indent=1)
        return 0
    print(f"lab {status['lab']} ({status['manifest']}, store {status['store']})")
    output.table([[n["name"], n["vtep"], n["daemon"], str(n["daemon_pid"])] for n in status["nodes"]],
                 ["NODE", "VTEP", "MESHNETD", "PID"])
    print()
    output.table([[p["name"], p["node"], p["state"], p["error"][:60]] for p in status["pods"]],
                 ["POD", "NODE", "STATE", "ERROR"])
    print()

    def recorded(lk: dict[str, Any]) -> str:
        # What each end's daemon wrote into its Topology status; "-" when nobody recorded the link.
        return ", ".join(f"{pod}: {said}" for pod, said in sorted(lk.get("status", {}).items()))[:70] or "-"

    def in_force(lk: dict[str, Any]) -> str:
        # Per end: administrative state and impairments in force (and those this node lacks).
        return "; ".join(f"{pod}: {end['text']}" for pod, end in sorted(lk.get("in_force", {}).items())
                         if end["text"] != "up") or "-"

    output.table([[str(lk["uid"]), lk["a"], lk["b"], lk["kind"], lk["state"], recorded(lk), in_force(lk)]
                  for lk in status["links"]],
                 ["UID", "END A", "END B", "KIND", "KERNEL", "STATUS (store)", "IN FORCE"])
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    from meshnet.lab.state import LabError

    lab = _lab(args, quiet=True)
    try:
        rec = lab.state.pods.get(args.pod)
    except LabError as e:
        return output.fail("lab exec", e)
    if rec is None:
        return output.fail("lab exec", f"no pod {args.pod!r} in lab {args.name}")
    cmd = [c for c in args.cmd if c != "--"] or ["sh"]
    os.execvp("ip", ["ip", "netns", "exec", rec.netns, *cmd])
    return 1  # not reached


def _cmd_ping(args: argparse.Namespace) -> int:
    if not args.loopbacks:
        if args.sample is not None:
            return output.fail("lab ping", "--sample: only with --loopbacks")
        return 0 if _print_connectivity(_lab(args, quiet=True).connectivity()) else 1
    from meshnet.lab.state import LabError
    from meshnet.topo.routes import ping_loopbacks

    if args.sample is not None and args.sample < 1:
        return output.fail("lab ping", f"--sample: {args.sample} is not a positive number of pairs")
    if not 1 <= args.workers <= 256:
        return output.fail("lab ping", f"--workers: {args.workers} is outside 1..256")
    try:
        results = ping_loopbacks(_lab(args, quiet=True), args.sample, args.seed, args.workers)
    except (LabError, ManifestError, OSError) as e:
        return output.fail("lab ping", e)
    if not results:
        print("no routers with loopbacks to ping (the manifest's pods have no loopback annotation)")
        return 0
    failed = [r for r in results if not r["ok"]]
    if failed:
        output.table([[r["from"], r["to"], r["address"], "FAIL"] for r in failed], ["FROM", "TO", "LOOPBACK", "PING"])
    what = f"a sample of {len(results)} (seed {args.seed})" if args.sample is not None else f"all {len(results)}"
    print(f"{len(results) - len(failed)}/{len(results)} router pairs reach each other's loopback ({what} pairs)")
    return 1 if failed else 0


def _cmd_pod_restart(args: argparse.Namespace) -> int:
    from meshnet.lab.state import LabError

    try:
        rec = _lab(args).restart_pod(args.pod, args.node)
    except LabError as e:
        return output.fail("lab pod restart", e)
    print(f"{rec.name}: {rec.state} ({rec.links} link(s), {rec.seconds:.2f}s){' ' + rec.error if rec.error else ''}")
    return 0 if rec.state == "up" else 1


def _cmd_daemon_restart(args: argparse.Namespace) -> int:
    from meshnet.lab.state import LabError

    try:
        _lab(args).restart_daemon(args.node)
    except LabError as e:
        return output.fail("lab daemon restart", e)
    print(f"meshnetd on {args.node} restarted")
    return 0


def add_parsers(sub: Any) -> None:
    lab = sub.add_parser("lab", help="an emulated multi-node cluster on this machine (root)")
    lsub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    def with_name(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--name", default="lab", help="lab name (several labs can run side by side)")
        return p

    p = with_name(lsub.add_parser("up", help="create nodes, start one meshnetd per node, ADD every pod"))
    p.add_argument("file")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--store", choices=("sqlite", "kube"), default="sqlite")
    p.add_argument("--kubeconfig", default="")
    p.add_argument("--cni-bin", default="", help="CNI binary to run (default: this venv's meshnet)")
    p.add_argument("--ping", action="store_true", help="print the connectivity matrix when up")
    p.add_argument("--routes", action="store_true",
                   help="route it: forwarding on, loopbacks on lo, shortest-path static routes in every pod")
    p.add_argument("--raise-neigh-limits", action="store_true",
                   help="raise the kernel's neighbour table limits (net.ipv4/ipv6.neigh.default.gc_thresh*, shared "
                        "by the whole machine) to fit the lab, until `lab down` restores them")
    p.set_defaults(func=_cmd_up)
    p = with_name(lsub.add_parser("apply", help="hot change: update the lab's store and pods from an edited FILE"))
    p.add_argument("file")
    p.set_defaults(func=_cmd_apply)
    p = with_name(lsub.add_parser("down", help="stop the daemons, remove every namespace and file of the lab"))
    p.set_defaults(func=_cmd_down)
    p = with_name(lsub.add_parser("status", help="nodes, pods and every link with kind and state"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    p = with_name(lsub.add_parser("exec", help="run a command in a pod: lab exec POD -- CMD..."))
    p.add_argument("pod")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_exec)
    p = with_name(lsub.add_parser("ping", help="ping every addressed link end from its peer"))
    p.add_argument("--loopbacks", action="store_true",
                   help="routed reachability instead: every router pings every other router's loopback (after "
                        "`lab up --routes`)")
    p.add_argument("--sample", type=int, default=None, metavar="N", help="with --loopbacks: only N random pairs")
    p.add_argument("--seed", type=int, default=0, help="with --sample: the seed that picks the pairs")
    p.add_argument("--workers", type=int, default=32, help="pings at once (default 32)")
    p.set_defaults(func=_cmd_ping)
    pod = lsub.add_parser("pod", help="pod operations").add_subparsers(dest="pod_command", required=True)
    p = with_name(pod.add_parser("restart", help="DEL, new network namespace, ADD"))
    p.add_argument("pod")
    p.add_argument("--node", default="", help="restart it on another node (a move)")
    p.set_defaults(func=_cmd_pod_restart)
    daemon = lsub.add_parser("daemon", help="daemon operations").add_subparsers(dest="daemon_command", required=True)
    p = with_name(daemon.add_parser("restart", help="kill -9 a node's meshnetd and start it again"))
    p.add_argument("node")
    p.set_defaults(func=_cmd_daemon_restart)
