"""Looking at a lab: every link's kind and state in the kernel beside what the daemons recorded in
the store (`status`), the bring-up summary, and pings across every addressed link (`connectivity`).
Reads only; changes nothing."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from meshnet import rtnl
from meshnet.daemon.kernel import link_kind
from meshnet.dryrun import UNDERLAY
from meshnet.executor import ExecError, Executor
from meshnet.lab.processes import alive
from meshnet.lab.state import LabNames, StateFile
from meshnet.model import LinkStatus, Manifest, load_manifest


def _in_force(s: LinkStatus) -> dict[str, Any]:
    """One end's recorded state and impairments in force, and a line for people."""
    api = s.to_api()
    return {"admin": s.admin, "impairments": api.get("impairments", {}), "unavailable": list(s.unavailable),
            "text": s.in_force or s.admin}


def _oper_up(entry: dict[str, Any]) -> bool:
    return "UP" in entry.get("flags", []) and "LOWER_UP" in entry.get("flags", [])


class Reports:
    def __init__(self, names: LabNames, file: StateFile, executor: Executor) -> None:
        self.names = names
        self.file = file
        self.executor = executor

    def manifest(self) -> Manifest:
        """What the lab last applied (its own copy; the file named in the state may have been edited since)."""
        applied = self.names.applied
        return load_manifest(applied if applied.exists() else self.file.state.manifest)

    def kernel_links(self, netns: str) -> dict[str, dict[str, Any]]:
        try:
            return {e["ifname"]: e for e in self.executor.show(netns)}  # details and addresses in one call
        except ExecError:
            return {}

    @staticmethod
    def link_states(netns: str) -> dict[str, dict[str, Any]]:
        """Each link's name, kind and flags (what `status` needs), without an `ip` process."""
        try:
            return rtnl.links(netns)
        except OSError:
            return {}  # the namespace is gone: its links are missing

    def status(self) -> dict[str, Any]:
        st = self.file.state
        manifest = self.manifest()
        # Read over rtnetlink in-process: one `ip` per pod made each poll of a big lab slow.
        view = {rec.name: self.link_states(rec.netns) for rec in st.pods.values() if rec.state == "up"}
        recorded = self._recorded_status()
        links: list[dict[str, Any]] = []
        seen: set[tuple[str, int]] = set()
        for t in manifest.topologies:
            for lnk in t.links:
                if (t.namespace, lnk.uid) in seen:
                    continue
                seen.add((t.namespace, lnk.uid))
                a = view.get(t.name, {}).get(lnk.local_intf)
                b = None if lnk.is_macvlan else view.get(lnk.peer_pod, {}).get(lnk.peer_intf)
                kind = link_kind(a) or link_kind(b) or ("macvlan" if lnk.is_macvlan else "")
                if t.name not in st.pods or (not lnk.is_macvlan and lnk.peer_pod not in st.pods):
                    state = "no-pod"
                elif a is not None and (lnk.is_macvlan or b is not None):
                    state = "up" if _oper_up(a) and (b is None or _oper_up(b)) else "down"
                else:
                    state = "missing"
                # What each end's daemon recorded in its pod's Topology status (the store's view).
                ends = [t.name] if lnk.is_macvlan else [t.name, lnk.peer_pod]
                said = {pod: recorded[(t.namespace, pod)][1][lnk.uid] for pod in ends
                        if lnk.uid in recorded.get((t.namespace, pod), ("", {}))[1]}
                # What is in force on each end (state, impairments, unavailable ones), as recorded.
                forced = {pod: _in_force(recorded[(t.namespace, pod)][2][lnk.uid]) for pod in ends
                          if lnk.uid in recorded.get((t.namespace, pod), ("", {}, {}))[2]}
                links.append({"uid": lnk.uid, "namespace": t.namespace, "a": f"{t.name}:{lnk.local_intf}",
                              "b": "host:" + lnk.peer_intf if lnk.is_macvlan else f"{lnk.peer_pod}:{lnk.peer_intf}",
                              "kind": kind, "state": state, "status": said, "in_force": forced})
        nodes = [{"name": n, "netns": self.names.node_netns(i), "vtep": str(UNDERLAY[i + 1]),
                  "daemon_pid": st.daemons.get(n, 0), "daemon": "running" if alive(st.daemons.get(n, 0)) else "down"}
                 for i, n in enumerate(st.nodes)]
        pods = [{**asdict(r), "plumbing_error": recorded.get((r.namespace, r.name), ("", {}, {}))[0]}
                for r in st.pods.values()]
        return {"lab": self.names.name, "manifest": st.manifest, "store": st.store_url.split("?")[0],
                "nodes": nodes, "pods": pods, "links": links}

    def _recorded_status(self) -> dict[tuple[str, str], tuple[str, dict[int, str], dict[int, LinkStatus]]]:
        """{(namespace, pod): (plumbing_error, {uid: "state" or "state: message"}, {uid: link status})}
        from the store."""
        from meshnet.store import open_store

        store = open_store(self.file.state.store_url)
        try:
            topologies = store.list(None)
        finally:
            store.close()
        return {t.key: (t.status.plumbing_error,
                        {s.uid: f"{s.state}: {s.message}" if s.message else s.state for s in t.status.links},
                        {s.uid: s for s in t.status.links if s.admin})
                for t in topologies}

    def unsettled(self, manifest: Manifest | None = None) -> list[str]:
        """Links between two pods that are up whose status, as the daemons recorded it in the
        store, is not settled yet: an end with no state or still pending (its daemon may be
        gathering news: link_status.COALESCE_SECONDS). One LIST of the store, no kernel read;
        `manifest`: the lab's, when the caller has read it already."""
        st = self.file.state
        up = {(r.namespace, r.name) for r in st.pods.values() if r.state == "up"}
        recorded = self._recorded_status()
        out: list[str] = []
        seen: set[tuple[str, int]] = set()
        for t in (manifest or self.manifest()).topologies:
            for lnk in t.links:
                if (t.namespace, lnk.uid) in seen:
                    continue
                seen.add((t.namespace, lnk.uid))
                ends = [t.name] if lnk.is_macvlan else [t.name, lnk.peer_pod]
                if not all((t.namespace, pod) in up for pod in ends):
                    continue
                for pod in ends:
                    said = recorded.get((t.namespace, pod), ("", {}, {}))[1].get(lnk.uid, "none")
                    if said == "none" or said.startswith("pending"):
                        out.append(f"{t.namespace}/{pod} uid {lnk.uid}: {said}")
        return out

    def summary(self, seconds: float) -> dict[str, Any]:
        status = self.status()
        kinds: dict[str, int] = {}
        for lnk in status["links"]:
            if lnk["state"] == "up":
                kinds[lnk["kind"]] = kinds.get(lnk["kind"], 0) + 1
        per_node: dict[str, int] = {}
        pods = self.file.state.pods.values()
        for rec in pods:
            per_node[rec.node] = per_node.get(rec.node, 0) + 1
        failed = {r.name: r.error for r in pods if r.state == "failed"}
        return {"lab": self.names.name, "seconds": round(seconds, 2), "pods_per_node": per_node,
                "links_up_by_kind": kinds, "links_total": len(status["links"]), "failed": failed}

    def connectivity(self, attempts: int = 3) -> list[dict[str, Any]]:
        """Ping each addressed link end from its peer (macvlan ends from the external namespace)."""
        st = self.file.state
        checks: list[tuple[str, str, str, str]] = []  # (from netns, from label, address, to label)
        for t in self.manifest().topologies:
            rec = st.pods.get(t.name)
            if rec is None or rec.state != "up":
                continue
            for lnk in t.links:
                if lnk.local_ip is None:
                    continue
                to = f"{t.name}:{lnk.local_intf}"
                if lnk.is_macvlan:
                    checks.append((self.names.external_netns, "external", str(lnk.local_ip.ip), to))
                    continue
                peer = st.pods.get(lnk.peer_pod)
                if peer is not None and peer.state == "up":
                    checks.append((peer.netns, f"{peer.name}:{lnk.peer_intf}", str(lnk.local_ip.ip), to))

        def ping(check: tuple[str, str, str, str]) -> dict[str, Any]:
            ns, frm, addr, to = check
            six = isinstance(ipaddress.ip_address(addr), ipaddress.IPv6Address)
            ok = False
            for _ in range(attempts):
                proc = subprocess.run(["ip", "netns", "exec", ns, "ping", *(["-6"] if six else []), "-c1", "-W1",
                                       addr], capture_output=True, check=False)
                if proc.returncode == 0:
                    ok = True
                    break
            return {"from": frm, "to": to, "address": addr, "ok": ok}

        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(ping, checks))


def daemon_events(names: LabNames, node: str) -> list[dict[str, Any]]:
    """The JSON events in meshnetd's log on `node`, in order; other lines (a traceback, a line cut
    by a kill) are skipped."""
    out = []
    for line in names.log(node).read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out
