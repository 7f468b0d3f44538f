"""Link ends after they exist: what is in force on one, and how to change it in place.

Pure (renders, runs nothing). The daemon's reconciler hands `change_end` the end as it was
applied and the end as the Topology now wants it; the commands it gets back change state,
addresses and impairments without recreating the interface, so routing adjacencies over the
pod's other links (and this one, for an impairment change) do not flap. `end_report` is what the
node can really do for an end — the part of its impairments this kernel lacks (netem) is named,
for status and for the ADD's log.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from meshnet.command import Command
from meshnet.model import Impairments
from meshnet.plan import ALL_CAPABILITIES, Capabilities, Endpoint, LinkPlan
from meshnet.render import render_end_change, render_impairments


@dataclass(frozen=True)
class EndReport:
    """One link end as this node applies it: its state and the impairments really in force."""

    uid: int
    intf: str
    state: str
    impairments: Impairments | None  # those in force (None: none)
    unavailable: tuple[str, ...] = ()  # declared fields this node cannot apply (e.g. no netem)

    @property
    def message(self) -> str:
        if not self.unavailable:
            return ""
        return (f"{self.intf}: {', '.join(self.unavailable)} unavailable on this node "
                f"(the kernel has no netem qdisc); the link works without them")

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uid": self.uid, "intf": self.intf, "state": self.state}
        if self.impairments is not None:
            out["impairments"] = self.impairments.to_api()
        if self.unavailable:
            out["unavailable"] = list(self.unavailable)
        return out


def in_force(impairments: Impairments | None, caps: Capabilities) -> tuple[Impairments | None, tuple[str, ...]]:
    """The part of `impairments` this node applies, and the names of the fields it cannot."""
    if impairments is None:
        return None, ()
    if caps.netem or not impairments.needs_netem:
        return impairments, ()
    kept = Impairments(rate=impairments.rate) if impairments.rate else None
    return kept, impairments.netem_fields


def end_report(end: Endpoint, uid: int, caps: Capabilities = ALL_CAPABILITIES) -> EndReport:
    applied, missing = in_force(end.impairments, caps)
    return EndReport(uid, end.intf, end.state, applied, missing)


def plan_reports(plan: LinkPlan, caps: Capabilities = ALL_CAPABILITIES) -> list[EndReport]:
    """A report per end the plan builds (both ends of a veth; the local end of a vxlan/macvlan)."""
    return [end_report(end, plan.uid, caps) for end in plan.ends]


def change_end(old: Endpoint, new: Endpoint, uid: int, caps: Capabilities = ALL_CAPABILITIES) -> list[Command]:
    """Commands that turn live end `old` into `new` in place (same namespace and interface).

    Only what differs: addresses removed then added, the state, then the qdisc tree replaced (or
    removed when `new` has no impairments left). An empty list when nothing differs. MAC, MTU or
    kind changes are not in-place changes: those go through the link's `update`/`add` templates.
    """
    if (old.netns, old.intf) != (new.netns, new.intf):
        raise ValueError(f"link uid {uid}: {old.netns}/{old.intf} and {new.netns}/{new.intf} are different "
                         f"interfaces; a live change keeps the interface")
    before, after = old.addresses, new.addresses
    removed = [ip for ip in before if ip not in after]
    added = [ip for ip in after if ip not in before]
    state = new.state if new.state != old.state else ""
    commands: list[Command] = []
    if removed or added or state:
        commands += render_end_change(new, uid, added=added, removed=removed, state=state)
    old_applied, _ = in_force(old.impairments, caps)
    new_applied, _ = in_force(new.impairments, caps)
    if new_applied != old_applied:
        if new_applied is None:
            commands += render_impairments(old, uid, "clear", caps)
        else:
            commands += render_impairments(replace(new, impairments=new_applied), uid, "update", caps)
    return commands
