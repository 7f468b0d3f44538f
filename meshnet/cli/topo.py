"""`meshnetctl topo ...` and `meshnetctl init-wait`: the topology tools of meshnet.topo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from meshnet.cli import output
from meshnet.model import ManifestError


def _cmd_build(args: argparse.Namespace) -> int:
    from meshnet.topo.builder import BuildError, build, render

    try:
        topo = build(args.n, args.links, seed=args.seed, prefix=args.prefix, namespace=args.namespace)
    except BuildError as e:
        return output.fail("topo build", e)
    text = render(topo, args.image, seed=args.seed)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    print(f"Total number of links generated: {len(topo.edges)}",
          file=sys.stderr if args.output == "-" else sys.stdout)
    return 0


def _cmd_routes(args: argparse.Namespace) -> int:
    from meshnet.model import load_manifest
    from meshnet.topo.routes import compute_routes, read_loopbacks

    try:
        plan = compute_routes(load_manifest(args.file).topologies, read_loopbacks(args.file))
    except ManifestError as e:
        return output.fail("topo routes", e)
    for pod in sorted(plan.routes):
        lo = plan.loopbacks.get(pod)
        print(f"# {pod}" + (f" (loopback {lo})" if lo else ""))
        for r in plan.routes[pod]:
            print(f"{r.destination} via {r.via} dev {r.dev}")
    for pod, missing in sorted(plan.unreachable.items()):
        output.to_stderr(f"warning: {pod} has no path to {', '.join(missing)}")
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from meshnet.model import load_manifest
    from meshnet.topo.graph import graph_data, render_html
    from meshnet.topo.routes import read_loopbacks

    try:
        manifest = load_manifest(args.file)
        loopbacks = read_loopbacks(args.file)
    except ManifestError as e:
        return output.fail("topo graph", e)
    states: list[dict[str, Any]] | None = None
    if args.lab:
        from meshnet.lab.cluster import Lab
        from meshnet.lab.state import LabError

        try:
            states = Lab(args.lab).status()["links"]
        except LabError as e:
            return output.fail("topo graph", e)
    data = graph_data(manifest, loopbacks, states)
    title = f"{Path(args.file).name}" + (f" in lab {args.lab}" if args.lab else "")
    Path(args.output).write_text(render_html(data, title, live=states is not None))
    print(f"{args.output}: {len(data['nodes'])} pods, {len(data['links'])} links")
    return 0


def _on_cluster(args: argparse.Namespace, verb: str, action: str, **load: Any) -> dict[str, Any] | None:
    """Load the manifest, connect, run `kube.<action>` with the user's credentials; None after a
    reported failure. Create and destroy differ only in the action and the summary."""
    from meshnet.topo import kube

    try:
        objects = kube.load(args.file, namespace=args.namespace, **load)
        client = kube.api_client(args.kubeconfig)
    except (ManifestError, kube.TopoKubeError) as e:
        output.fail(verb, e)
        return None
    try:
        summary: dict[str, Any] = getattr(kube, action)(objects, client, timeout=args.timeout,
                                                         progress=output.to_stderr)
        return summary
    except kube.TopoKubeError as e:
        output.fail(verb, e)
        return None
    finally:
        client.close()


def _cmd_create(args: argparse.Namespace) -> int:
    summary = _on_cluster(args, "topo create", "create", init_image=args.init_image)
    if summary is None:
        return 1
    print(f"{summary['pods']} pods Running, {summary['topologies']} Topologies, in {summary['seconds']:.1f}s")
    return 0


def _cmd_destroy(args: argparse.Namespace) -> int:
    summary = _on_cluster(args, "topo destroy", "destroy")
    if summary is None:
        return 1
    print(f"deleted {summary['pods deleted']} pods and {summary['topologies deleted']} Topologies "
          f"in {summary['seconds']:.1f}s")
    return 0


def _cmd_init_wait(args: argparse.Namespace) -> int:
    from meshnet.initwait import run

    return run(args.n, args.timeout, args.sleep)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, ~/.kube/config, or in-cluster")
    p.add_argument("--namespace", default=None,
                   help="put every object in this namespace (default: each object's own, else default)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")


def add_parsers(sub: Any) -> None:
    from meshnet.topo.builder import DEFAULT_IMAGE
    from meshnet.topo.kube import DEFAULT_INIT_IMAGE

    topo = sub.add_parser("topo", help="topology tools: build, routes, graph, create, destroy")
    tsub = topo.add_subparsers(dest="topo_command", required=True, metavar="TOPO_COMMAND")

    p = tsub.add_parser("build", help="a random connected topology of N routers (Pods + Topologies)")
    p.add_argument("n", type=int, metavar="N", help="number of routers")
    p.add_argument("--links", type=int, default=None, help="number of links, N-1 (a tree, the default) .. N(N-1)/2")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same file")
    p.add_argument("--prefix", default="qrtr", help="pod name prefix (pods PREFIX-1..PREFIX-N)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"router container image (default {DEFAULT_IMAGE})")
    p.add_argument("-o", "--output", required=True, help="output file ('-' for stdout)")
    p.set_defaults(func=_cmd_build)

    p = tsub.add_parser("routes", help="print the shortest-path static routes `lab up --routes` installs")
    p.add_argument("file")
    p.set_defaults(func=_cmd_routes)

    p = tsub.add_parser("graph", help="a self-contained HTML page drawing the topology")
    p.add_argument("file")
    p.add_argument("--lab", default="", help="colour links by their live state in this lab")
    p.add_argument("-o", "--output", default="graph.html")
    p.set_defaults(func=_cmd_graph)

    p = tsub.add_parser("create", help="create Topologies, then Pods (with init-wait) on a cluster; wait for Running")
    _cluster_args(p)
    p.add_argument("--init-image", default=DEFAULT_INIT_IMAGE, help="image of the init-wait container "
                   f"(must contain meshnetctl; default {DEFAULT_INIT_IMAGE})")
    p.set_defaults(func=_cmd_create)

    p = tsub.add_parser("destroy", help="delete the Pods and Topologies of a manifest; wait until gone")
    _cluster_args(p)
    p.set_defaults(func=_cmd_destroy)

    p = sub.add_parser("init-wait", help="wait until this network namespace has N interfaces besides lo")
    p.add_argument("n", type=int, metavar="N")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds; 0 (default) waits forever")
    p.add_argument("--sleep", type=float, default=1.0, help="seconds between checks (default 1)")
    p.set_defaults(func=_cmd_init_wait)
