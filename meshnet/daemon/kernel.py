"""The kernel's view of a node's links and how it compares with the plans.

`read_view` is the only kernel read (over rtnetlink; `ip` through the executor as a fallback);
everything else here is a pure function of an `ip -j -d addr show` shaped entry, a plan and a
Topology, so the daemon's rooms ask one question one way: what kind a link is, whether it is
configured, whether a vxlan matches, what differs, what is garbage.
"""

from __future__ import annotations

import errno
import functools
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from meshnet import naming, rtnl
from meshnet.command import Command
from meshnet.ends import change_end, in_force
from meshnet.executor import ExecError, Executor
from meshnet.model import Impairments, IPInterface, Topology, shared_interface
from meshnet.plan import ALL_CAPABILITIES, Capabilities, Endpoint, LinkPlan, VethPlan, VxlanPlan
from meshnet.render import render

# {netns: {ifname: `ip -j -d addr show` entry}}
KernelView = Mapping[str, Mapping[str, Mapping[str, Any]]]
# {(netns, ifname): impairments this daemon put in force on that end (None: none)}. The kernel's
# qdisc tree is not read back (netem's options do not round-trip through `tc -j`): what was
# applied is remembered instead; an end missing from it gets its tree replaced once (idempotent).
Applied = Mapping[tuple[str, str], Impairments | None]


def read_view(executor: Executor, names: Iterable[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{netns: {ifname: entry}} for each namespace (missing ones are empty), each entry shaped as
    `ip -j -d addr show` prints the link, with the keys this module reads (rtnetlink's slim entries:
    ifname, flags, group, linkinfo, addr_info; the `ip` fallback's have all of them).

    Read in-process over rtnetlink (one dump of the links and one of the addresses per namespace,
    a short-lived thread entering the namespaces to open the sockets): one `ip` process per
    namespace was most of an idle daemon's CPU. `ip -j -d addr show` through the executor only
    when rtnetlink cannot read a namespace that exists (an error other than its absence: e.g. a
    kernel or a sandbox that refuses setns, or dumps the kernel kept marking interrupted), so
    nothing is worse than before."""
    unique = list(dict.fromkeys(names))
    found = rtnl.views(unique, slim=True)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for ns in unique:
        view = found.get(ns)
        if isinstance(view, dict):
            out[ns] = view
        elif view is None or view.errno in (None, errno.ENOENT):
            out[ns] = {}  # gone, or not a name meshnet uses: `ip -n` would have failed the same way
        else:
            with _STATS_LOCK:  # CNI calls, peer requests and the reconciler read at once
                STATS["ip_fallbacks"] += 1
            out[ns] = _read_with_ip(executor, ns)
    return out


def read_ends(executor: Executor, wanted: Mapping[str, Iterable[str]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{netns: {ifname: entry}} for the named interfaces of each namespace (absent ones left out;
    a missing namespace empty), entries as `read_view` gives them.

    For callers that look at given ends, not at a whole namespace (a peer call's page, a lost
    race): asked interface by interface over rtnetlink, so the cost follows the ends, not the
    namespace's size, and no namespace-wide dump is interrupted by the kernel's work on other
    interfaces (meshnet.rtnl.ends). A namespace rtnetlink cannot read that way is read whole
    (`read_view`, with its own fallback), so nothing is worse than before."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    whole: list[str] = []
    for ns, names in wanted.items():
        found = rtnl.ends(ns, names, slim=True)
        if isinstance(found, dict):
            out[ns] = found
        elif found.errno == errno.ENOENT:
            out[ns] = {}
        else:
            whole.append(ns)
    if whole:
        for ns, view in read_view(executor, whole).items():
            names = set(wanted[ns])
            out[ns] = {name: entry for name, entry in view.items() if name in names}
    return out


# Namespaces read through `ip` because rtnetlink could not (the tests pin it at 0).
STATS = {"ip_fallbacks": 0}
_STATS_LOCK = threading.Lock()


def _read_with_ip(executor: Executor, ns: str) -> dict[str, dict[str, Any]]:
    try:
        return {e["ifname"]: e for e in executor.show(ns)}
    except ExecError:
        return {}


class PassViews:
    """The kernel views of one reconcile pass: each namespace read once per pass, even when it is
    the veth peer of several pods (a node's pods share namespaces through their veths).

    A view served from an earlier pod's read may be older than the pod's own link locks: a pass
    acts on it only after `read(..., fresh=True)` (the caller asks when the old view shows work,
    or when the pass would record up a link the status does not show up),
    and forgets what it changed, so acting is always on a read made under the pod's locks, as
    before, and an idle pass reads every namespace exactly once. Used by one thread at a time."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._views: dict[str, dict[str, dict[str, Any]]] = {}
        self.reads = 0  # namespaces read (the tests count them)

    def read(self, names: Iterable[str], fresh: bool = False) -> tuple[dict[str, dict[str, dict[str, Any]]], bool]:
        """The views of `names`, and whether any of them was read before this call."""
        unique = list(dict.fromkeys(names))
        todo = unique if fresh else [ns for ns in unique if ns not in self._views]
        if todo:
            self._views.update(read_view(self._executor, todo))
            self.reads += len(todo)
        return {ns: self._views[ns] for ns in unique}, len(todo) < len(unique)

    def prefetch(self, names: Iterable[str]) -> None:
        """Read these namespaces now, all at once (one thread enters them in turn): a full pass
        knows its pods' namespaces before it plans any of them."""
        self.read(names)

    def forget(self, names: Iterable[str]) -> None:
        for ns in names:
            self._views.pop(ns, None)


def link_kind(entry: Mapping[str, Any] | None) -> str:
    """The link's kind (`veth`, `vxlan`, `macvlan`, ...); empty for a missing interface."""
    if not entry:
        return ""
    return str(entry.get("linkinfo", {}).get("info_kind", ""))


def ours(entry: Mapping[str, Any] | None) -> bool:
    """The interface carries meshnet's mark (its link group): the only kind meshnet ever removes."""
    return bool(entry) and str((entry or {}).get("group")) == str(naming.LINK_GROUP)


def _vxlan_data(entry: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (entry or {}).get("linkinfo", {}).get("info_data", {})


def addresses(entry: Mapping[str, Any]) -> set[str]:
    """The interface's addresses as `ip/prefixlen`, link-local ones included."""
    return {f"{a.get('local')}/{a.get('prefixlen')}" for a in entry.get("addr_info", ())}


def _kernel_addresses(entry: Mapping[str, Any]) -> tuple[IPInterface, ...]:
    """The interface's addresses (link-local IPv6 aside: the kernel makes those itself)."""
    out: list[IPInterface] = []
    for a in entry.get("addr_info", ()):
        if a.get("scope") == "link":
            continue
        parsed = _interface(f"{a.get('local')}/{a.get('prefixlen')}")
        if parsed is not None:  # else not an address meshnet could have set: the comparison re-adds ours
            out.append(parsed)
    return tuple(out)


@functools.lru_cache(maxsize=8192)
def _interface(text: str) -> IPInterface | None:
    """An address parsed once: every pass compares the same few per link (parsing was a tenth of
    an idle pass). The object the Topologies hold for it, when they hold one: not a second copy
    of each link's addresses (~1 MiB at 1500 links)."""
    try:
        return shared_interface(text)
    except ValueError:
        return None


def admin_up(entry: Mapping[str, Any]) -> bool:
    return "UP" in entry.get("flags", ())


def configured(entry: Mapping[str, Any] | None, end: Endpoint) -> bool:
    """The interface has the end's administrative state and exactly its addresses (local_ip and
    local_ips; link-local IPv6 aside)."""
    if not entry or admin_up(entry) != (end.state != "down"):
        return False
    return set(_kernel_addresses(entry)) == set(end.addresses)


def as_found(entry: Mapping[str, Any], end: Endpoint, applied: Applied) -> Endpoint:
    """End `end` as the kernel (addresses, state) and this daemon's record (impairments) show it."""
    return replace(end, ip=None, ips=_kernel_addresses(entry), state="up" if admin_up(entry) else "down",
                   impairments=applied.get((end.netns, end.intf)))


def end_changes(entry: Mapping[str, Any], end: Endpoint, uid: int, caps: Capabilities,
                applied: Applied) -> list[Command]:
    """In-place commands that turn an existing interface into `end` (nothing when it matches):
    addresses, state and the qdisc tree, never a new interface. An end whose impairments this
    daemon has no record of gets its tree replaced when it declares one (idempotent)."""
    # An end missing from `applied` (daemon restarted) counts as having no tree: one that declares
    # impairments gets `tc qdisc replace`, which makes whatever is there what we want.
    if configured(entry, end) and (in_force(applied.get((end.netns, end.intf)), caps)[0]
                                   == in_force(end.impairments, caps)[0]):
        # What change_end would find: the same addresses, state and tree, so nothing to do. Said
        # here without building the end as found (most of an idle pass over 1000 ends).
        return []
    return change_end(as_found(entry, end, applied), end, uid, caps)


def in_force_after(plans: Iterable[LinkPlan], caps: Capabilities) -> dict[tuple[str, str], Impairments | None]:
    """What `Applied` holds for the plans' ends once they are built."""
    return {(e.netns, e.intf): in_force(e.impairments, caps)[0] for p in plans for e in p.ends}


def vxlan_matches(entry: Mapping[str, Any] | None, plan: VxlanPlan) -> bool:
    if link_kind(entry) != "vxlan":
        return False
    data = _vxlan_data(entry)
    return (data.get("id") == plan.vni and data.get("remote") == plan.remote_ip
            and data.get("local") == plan.vtep_ip and data.get("port") == plan.port)


def vxlan_towards(entry: Mapping[str, Any] | None, remote: str, vni: int) -> bool:
    """A vxlan end with this VNI pointing at `remote` (a peer's VTEP)."""
    data = _vxlan_data(entry)
    return link_kind(entry) == "vxlan" and data.get("remote") == remote and data.get("id") == vni


def vni_clash(e: ExecError) -> bool:
    """The kernel refused a vxlan because its VNI is in use on this node (another namespace's)."""
    text = f"{e} {e.stderr}"
    return "VNI already exists" in text or ("File exists" in text and "vxlan" in text)


def differences(plans: Sequence[LinkPlan], view: KernelView, caps: Capabilities = ALL_CAPABILITIES,
                applied: Applied | None = None) -> list[Command]:
    """Commands that turn the kernel into the plans: missing links made, wrong ones made again;
    links that exist with the right kind and peer are changed in place (addresses, state,
    impairments: `end_changes`), so a live edit never recreates an interface; links that match
    are left alone."""
    applied = applied or {}
    commands: list[Command] = []
    for p in plans:
        entries = [view.get(e.netns, {}).get(e.intf) for e in p.ends]
        if isinstance(p, VethPlan):
            if all(link_kind(e) == "veth" for e in entries):
                for e, end in zip(entries, p.ends, strict=True):
                    commands += end_changes(e or {}, end, p.uid, caps, applied)
                continue
            # Missing, or an end whose far side is elsewhere (a stale pair): make the pair again.
            # Only ends of ours go; anything else by that name makes the add fail, which is reported.
            commands += [Command(end.netns, ("link", "del", end.intf), p.uid)
                         for e, end in zip(entries, p.ends, strict=True) if ours(e)]
            commands += render([p], "add", caps)
            continue
        entry = entries[0]
        if isinstance(p, VxlanPlan):
            if not vxlan_matches(entry, p):
                # Remade only over an end of ours; anything else by that name makes the add fail
                # (reported), it is never deleted.
                commands += render([p], "update" if ours(entry) else "add", caps)
                continue
        elif link_kind(entry) != "macvlan":
            if ours(entry):
                commands.append(Command(p.local.netns, ("link", "del", p.local.intf), p.uid))
            commands += render([p], "add", caps)
            continue
        commands += end_changes(entry or {}, p.ends[0], p.uid, caps, applied)
    return commands


def garbage(topo: Topology, ns_name: str, view: Mapping[str, Mapping[str, Any]],
            orphans: Iterable[str] = ()) -> list[Command]:
    """Interfaces meshnet made in this pod that no desired link owns any more, as `link del`s.

    Only interfaces in meshnet's link group are candidates, among them every one no desired link
    owns and `orphans` (ends of links whose peer is gone): nothing another plugin made is ever
    touched, whatever the store's status names (it is not read here: anyone may have written it).
    """
    orphaned = set(orphans)
    desired = {lnk.local_intf for lnk in topo.links} - orphaned
    marked = {name for name, entry in view.items() if ours(entry)}
    return [Command(ns_name, ("link", "del", name)) for name in sorted(marked - desired)]


def check_problems(plans: Sequence[LinkPlan], view: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What CHECK reports: each pod-side end missing, of another kind, pointing elsewhere or
    without its address (`view` is the pod's namespace)."""
    problems = []
    for lp in plans:
        end = lp.a if isinstance(lp, VethPlan) else lp.local
        entry = view.get(end.intf)
        if entry is None:
            problems.append(f"link uid {lp.uid}: {end.intf} is missing")
        elif link_kind(entry) != lp.kind:
            problems.append(f"link uid {lp.uid}: {end.intf} is a {link_kind(entry) or 'device'} not a {lp.kind}")
        elif isinstance(lp, VxlanPlan) and not vxlan_matches(entry, lp):
            problems.append(f"link uid {lp.uid}: {end.intf} has the wrong VNI or remote")
        elif end.ip is not None and str(end.ip) not in addresses(entry):
            problems.append(f"link uid {lp.uid}: {end.intf} lacks {end.ip}")
    return problems
