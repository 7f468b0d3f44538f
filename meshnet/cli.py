"""meshnetctl: dry-run plans, validation, the emulated lab, topology tools, node installation."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshnet.model import ManifestError, load_manifest

if TYPE_CHECKING:
    from meshnet.lab.cluster import Lab


def _cmd_validate(args: argparse.Namespace) -> int:
    ok = True
    for path in args.files:
        try:
            m = load_manifest(path)
        except ManifestError as e:
            ok = False
            print(f"{path}: invalid", file=sys.stderr)
            for p in e.problems:
                print(f"  {p}", file=sys.stderr)
            continue
        links = sum(len(t.links) for t in m.topologies)
        print(f"{path}: ok ({len(m.topologies)} topologies, {len(m.pods)} pods, {links} link ends)")
    return 0 if ok else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from meshnet.dryrun import PlanError, layout_for, setup_script, teardown_script
    from meshnet.render import RenderError

    try:
        lab = layout_for(load_manifest(args.file), args.nodes, args.prefix)
        text = teardown_script(lab) if args.delete else setup_script(lab)
    except (ManifestError, PlanError, RenderError) as e:
        print(f"meshnetctl plan: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def _lab(args: argparse.Namespace, *, quiet: bool = False) -> Lab:
    from meshnet.lab.cluster import Lab

    progress = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    return Lab(args.name, progress=progress)


def _prog() -> str:
    """How the user ran us, so printed hints work as typed (e.g. .venv/bin/meshnetctl)."""
    argv0 = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == "meshnetctl" else "meshnetctl"
    if os.sep not in argv0:
        return argv0
    rel = os.path.relpath(argv0)
    return rel if not rel.startswith("..") else argv0


def _print_table(rows: list[list[str]], head: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    for row in [head, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def _print_connectivity(results: list[dict[str, Any]]) -> bool:
    if not results:
        print("no addressed links to ping")
        return True
    _print_table([[r["from"], r["to"], r["address"], "ok" if r["ok"] else "FAIL"] for r in results],
                 ["FROM", "TO", "ADDRESS", "PING"])
    good = sum(r["ok"] for r in results)
    print(f"{good}/{len(results)} link ends answer")
    return good == len(results)


def _cmd_lab_up(args: argparse.Namespace) -> int:
    from meshnet.lab.cluster import LabError

    lab = _lab(args)
    try:
        cni_bin = [args.cni_bin] if args.cni_bin else None
        summary = lab.up(args.file, args.nodes, store=args.store, kubeconfig=args.kubeconfig, cni_bin=cni_bin)
    except (LabError, ManifestError) as e:
        print(f"meshnetctl lab up: {e}", file=sys.stderr)
        if not isinstance(e, ManifestError) and lab.exists():
            print(f"the lab is partly up; remove it with: meshnetctl lab down --name {args.name}", file=sys.stderr)
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
    print(f"  {_prog()} lab exec --name {args.name} {first} -- ip -br addr")
    print(f"  {_prog()} lab status --name {args.name}")
    print(f"  {_prog()} lab down --name {args.name}")
    return 0 if ok else 1


def _cmd_lab_apply(args: argparse.Namespace) -> int:
    from meshnet.lab.cluster import LabError

    try:
        result = _lab(args).apply(args.file)
    except (LabError, ManifestError) as e:
        print(f"meshnetctl lab apply: {e}", file=sys.stderr)
        return 1
    for what, names in result.items():
        if names:
            print(f"{what.replace('_', ' ')}: {', '.join(names)}")
    if not any(result.values()):
        print("nothing changed")
    return 0


def _cmd_lab_down(args: argparse.Namespace) -> int:
    problems = _lab(args).down()
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"lab {args.name} removed")
    return 0


def _cmd_lab_status(args: argparse.Namespace) -> int:
    from meshnet.lab.cluster import LabError

    try:
        status = _lab(args, quiet=True).status()
    except LabError as e:
        print(f"meshnetctl lab status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"lab {status['lab']} ({status['manifest']}, store {status['store']})")
    _print_table([[n["name"], n["vtep"], n["daemon"], str(n["daemon_pid"])] for n in status["nodes"]],
                 ["NODE", "VTEP", "MESHNETD", "PID"])
    print()
    _print_table([[p["name"], p["node"], p["state"], p["error"][:60]] for p in status["pods"]],
                 ["POD", "NODE", "STATE", "ERROR"])
    print()
    def recorded(lk: dict[str, Any]) -> str:
        # What each end's daemon wrote into its Topology status; "-" when nobody recorded the link.
        return ", ".join(f"{pod}: {said}" for pod, said in sorted(lk.get("status", {}).items()))[:70] or "-"

    _print_table([[str(lk["uid"]), lk["a"], lk["b"], lk["kind"], lk["state"], recorded(lk)] for lk in status["links"]],
                 ["UID", "END A", "END B", "KIND", "KERNEL", "STATUS (store)"])
    return 0


def _cmd_lab_exec(args: argparse.Namespace) -> int:
    from meshnet.lab.cluster import LabError

    lab = _lab(args, quiet=True)
    try:
        rec = lab.state.pods.get(args.pod)
    except LabError as e:
        print(f"meshnetctl lab exec: {e}", file=sys.stderr)
        return 1
    if rec is None:
        print(f"meshnetctl lab exec: no pod {args.pod!r} in lab {args.name}", file=sys.stderr)
        return 1
    cmd = [c for c in args.cmd if c != "--"] or ["sh"]
    os.execvp("ip", ["ip", "netns", "exec", rec.netns, *cmd])
    return 1  # not reached


def _cmd_lab_ping(args: argparse.Namespace) -> int:
    return 0 if _print_connectivity(_lab(args, quiet=True).connectivity()) else 1


def _cmd_lab_pod_restart(args: argparse.Namespace) -> int:
    rec = _lab(args).restart_pod(args.pod, args.node)
    print(f"{rec.name}: {rec.state} ({rec.links} link(s), {rec.seconds:.2f}s){' ' + rec.error if rec.error else ''}")
    return 0 if rec.state == "up" else 1


def _cmd_lab_daemon_restart(args: argparse.Namespace) -> int:
    _lab(args).restart_daemon(args.node)
    print(f"meshnetd on {args.node} restarted")
    return 0


def _add_lab_parser(sub: Any) -> None:
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
    p.set_defaults(func=_cmd_lab_up)
    p = with_name(lsub.add_parser("apply", help="hot change: update the lab's store and pods from an edited FILE"))
    p.add_argument("file")
    p.set_defaults(func=_cmd_lab_apply)
    p = with_name(lsub.add_parser("down", help="DEL every pod, stop the daemons, remove everything"))
    p.set_defaults(func=_cmd_lab_down)
    p = with_name(lsub.add_parser("status", help="nodes, pods and every link with kind and state"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_lab_status)
    p = with_name(lsub.add_parser("exec", help="run a command in a pod: lab exec POD -- CMD..."))
    p.add_argument("pod")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_lab_exec)
    p = with_name(lsub.add_parser("ping", help="ping every addressed link end from its peer"))
    p.set_defaults(func=_cmd_lab_ping)
    pod = lsub.add_parser("pod", help="pod operations").add_subparsers(dest="pod_command", required=True)
    p = with_name(pod.add_parser("restart", help="DEL, new network namespace, ADD"))
    p.add_argument("pod")
    p.add_argument("--node", default="", help="restart it on another node (a move)")
    p.set_defaults(func=_cmd_lab_pod_restart)
    daemon = lsub.add_parser("daemon", help="daemon operations").add_subparsers(dest="daemon_command", required=True)
    p = with_name(daemon.add_parser("restart", help="kill -9 a node's meshnetd and start it again"))
    p.add_argument("node")
    p.set_defaults(func=_cmd_lab_daemon_restart)


def _cmd_install_cni(args: argparse.Namespace) -> int:
    from meshnet import install

    try:
        if args.uninstall:
            install.uninstall(args.conf_dir, args.bin_dir)
            print(f"meshnet removed from {args.conf_dir} and {args.bin_dir}")
            return 0
        path = install.install(args.conf_dir, args.bin_dir, mode=args.mode, binary=args.binary,
                               socket=args.socket, log_file=args.log_file, wait=args.wait)
    except install.InstallError as e:
        print(f"meshnetctl install-cni: {e}", file=sys.stderr)
        return 1
    print(f"{path}: meshnet ({args.mode}) in front of {install.find_network_config(args.conf_dir).name}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from meshnet.daemon.api import health_check

    try:
        answer = health_check(args.socket)
    except OSError as e:
        print(f"meshnetctl health: {args.socket}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0 if answer.get("ok") and (answer.get("ready") or not args.ready) else 1


def _add_node_parsers(sub: Any) -> None:
    from meshnet import install

    p = sub.add_parser("install-cni", help="install meshnet's CNI binary and network config on this node")
    p.add_argument("--conf-dir", type=Path, default=Path("/etc/cni/net.d"))
    p.add_argument("--bin-dir", type=Path, default=Path("/opt/cni/bin"))
    p.add_argument("--mode", choices=install.MODES, default="delegate",
                   help="delegate: the node's network runs as meshnet's delegate (default); chain: meshnet last")
    p.add_argument("--binary", type=Path, help="CNI binary: file, standalone build dir, or a link to its entry point")
    p.add_argument("--socket", default=install.DEFAULT_SOCKET)
    p.add_argument("--log-file")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the node's network config to appear")
    p.add_argument("--uninstall", action="store_true", help="remove meshnet's config and binary again")
    p.set_defaults(func=_cmd_install_cni)

    p = sub.add_parser("health", help="ask the node's meshnetd whether it is up (probes)")
    p.add_argument("--socket", default=install.DEFAULT_SOCKET)
    p.add_argument("--ready", action="store_true", help="also require the first reconciliation to be done")
    p.set_defaults(func=_cmd_health)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnetctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check Topology manifests; every problem named by object, uid and field")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="dry run: print the ip commands of a lab as a replayable shell script")
    p.add_argument("file")
    p.add_argument("--nodes", type=int, default=1, help="emulated nodes (pods round-robin); default 1")
    p.add_argument("--prefix", default="mnd-", help="namespace name prefix; default mnd-")
    p.add_argument("--delete", action="store_true", help="print the teardown instead")
    p.set_defaults(func=_cmd_plan)

    _add_lab_parser(sub)
    from meshnet.topo.cli import add_topo_parsers

    add_topo_parsers(sub)
    _add_node_parsers(sub)
    from meshnet.standalone import add_parsers as add_standalone_parsers

    add_standalone_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def run() -> None:
    """The `meshnetctl` program. `meshnetctl ... | head` ends quietly, as other command-line tools
    do; only the program does this, never `main()` called from other Python code (a test runner
    killed by SIGPIPE would be no improvement)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())


if __name__ == "__main__":
    run()
