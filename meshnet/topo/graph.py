"""`meshnetctl topo graph`: one self-contained HTML page drawing a topology's pods and links.

The page needs no network: the data is an inline JSON block, the layout and drawing are inline
JavaScript (`_JS` below, a force-directed layout into SVG), the style inline CSS. Hovering a
pod shows its loopback and interfaces with addresses, hovering a link its uid, ends and state.
With a lab, links are coloured by their live state from `Lab.status()`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from typing import Any

from meshnet.model import Manifest

STATES = ("up", "down", "missing", "no-pod", "planned")

_CSS = """
body { font: 14px system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { padding: 8px 16px; background: #1f2a36; color: #fff; display: flex; gap: 24px; align-items: baseline; }
header h1 { font-size: 16px; margin: 0; }
#status { font-size: 12px; opacity: .8; }
.legend span { margin-right: 12px; font-size: 12px; }
.legend i { display: inline-block; width: 18px; height: 4px; margin-right: 4px; vertical-align: middle; }
svg { width: 100%; height: calc(100vh - 40px); display: block; }
.link path { fill: none; stroke-width: 3; stroke: #7a8a99; }
.link:hover path { stroke-width: 6; }
.link .ifname { display: none; font-size: 11px; fill: #333; text-anchor: middle; }
.link:hover .ifname { display: block; }
.state-up path { stroke: #2e9d44; } .state-down path { stroke: #d33; }
.state-missing path { stroke: #e08a00; stroke-dasharray: 6 4; }
.state-no-pod path { stroke: #aaa; stroke-dasharray: 2 4; }
.node circle { fill: #2d6cdf; stroke: #fff; stroke-width: 2; }
.node.kind-external circle { fill: #8a55c7; }
.node:hover circle { stroke: #111; }
.node .label { font-size: 12px; text-anchor: middle; }
"""

_COLOURS = {"up": "#2e9d44", "down": "#d33", "missing": "#e08a00", "no-pod": "#aaa", "planned": "#7a8a99"}


def graph_data(manifest: Manifest, loopbacks: Mapping[str, Any] | None = None,
               link_states: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Nodes (pods, plus one per host interface that macvlan links reach) and links (one per uid)."""
    loopbacks = loopbacks or {}
    states = {(str(s.get("namespace")), int(s["uid"])): s for s in link_states or ()}
    nodes: dict[str, dict[str, Any]] = {}

    def node(name: str, kind: str = "pod") -> dict[str, Any]:
        if name not in nodes:
            lo = loopbacks.get(name)
            nodes[name] = {"id": name, "kind": kind, "loopback": str(lo) if lo is not None else "",
                           "interfaces": []}
        return nodes[name]

    def shape(pod: str, namespace: str, uid: int, live: Mapping[str, Any] | None) -> str:
        """One end's state and impairments: as in force (lab status) when known, else as declared."""
        forced = (live or {}).get("in_force", {}).get(pod)
        if forced:
            return "" if forced.get("text") == "up" else str(forced.get("text", ""))
        topo = manifest.topology(namespace, pod)
        lnk = topo.link(uid) if topo is not None else None
        if lnk is None:
            return ""
        parts = ["down"] if lnk.state == "down" else []
        parts += [f"{k} {v}" for k, v in (lnk.impairments.to_api() if lnk.impairments else {}).items()]
        return ", ".join(parts)

    for p in manifest.pods:
        node(p.name)
    links: dict[tuple[str, int], dict[str, Any]] = {}
    for t in sorted(manifest.topologies, key=lambda x: x.name):
        me = node(t.name)
        for lnk in sorted(t.links, key=lambda x: x.uid):
            peer = f"host:{lnk.peer_intf}" if lnk.is_macvlan else lnk.peer_pod
            me["interfaces"].append({"name": lnk.local_intf, "ip": str(lnk.local_ip or ""), "peer": peer})
            key = (t.namespace, lnk.uid)
            if key in links:
                continue
            node(peer, "external" if lnk.is_macvlan else "pod")
            live = states.get(key)
            links[key] = {"uid": lnk.uid, "a": t.name, "a_intf": lnk.local_intf, "a_ip": str(lnk.local_ip or ""),
                          "b": peer, "b_intf": lnk.peer_intf, "b_ip": str(lnk.peer_ip or ""),
                          "kind": str(live.get("kind", "")) if live else ("macvlan" if lnk.is_macvlan else ""),
                          "state": str(live["state"]) if live else "planned",
                          # Issue 15: what leaves each end (down, delay, loss, rate ...), for the tooltip.
                          "a_shape": shape(t.name, t.namespace, lnk.uid, live),
                          "b_shape": "" if lnk.is_macvlan else shape(peer, t.namespace, lnk.uid, live)}
    return {"nodes": list(nodes.values()), "links": list(links.values())}


def render_html(data: Mapping[str, Any], title: str, *, live: bool = False) -> str:
    # "</" inside a <script> block would end it early; JSON allows escaping the slash.
    payload = json.dumps(data, sort_keys=True).replace("</", "<\\/").replace("<!--", "<\\u0021--")
    legend = ""
    if live:
        legend = '<div class="legend">' + "".join(
            f'<span><i style="background:{_COLOURS[s]}"></i>{s}</span>' for s in STATES if s != "planned") + "</div>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{html.escape(title)}</h1><span>{len(data["nodes"])} pods, {len(data["links"])} links</span>{legend}
<span id="status" data-state="loading">loading (needs JavaScript)</span></header>
<svg id="graph" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="topology graph"></svg>
<script type="application/json" id="topo-data">{payload}</script>
<script>{_JS}</script>
</body>
</html>
"""


# The page's whole program, inlined into every page (kept here, not in a package-data file, so an
# installed wheel can never lose it).
_JS = r"""// meshnet topology graph: lays out the inline data (Fruchterman-Reingold, deterministic start on a
// circle) and draws it as SVG. No network access: everything the page needs is inline.
(function () {
  "use strict";
  var status = document.getElementById("status");
  window.addEventListener("error", function (ev) {
    status.textContent = "error: " + ev.message;
    status.setAttribute("data-state", "error");
  });
  var data = JSON.parse(document.getElementById("topo-data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";
  var svg = document.getElementById("graph");
  var n = data.nodes.length;
  var W = Math.max(600, 90 * Math.sqrt(n) * 3), H = W * 0.7;
  var nodes = data.nodes.map(function (d, i) {
    var a = 2 * Math.PI * i / Math.max(1, n);
    return { d: d, x: W / 2 + W / 3 * Math.cos(a), y: H / 2 + H / 3 * Math.sin(a), dx: 0, dy: 0 };
  });
  var byId = {};
  nodes.forEach(function (p) { byId[p.d.id] = p; });
  var edges = data.links.filter(function (l) { return byId[l.a] && byId[l.b]; });

  // Fruchterman-Reingold: all pairs repel, links attract; the step shrinks every round.
  var k = Math.sqrt(W * H / Math.max(1, n)) * 0.6;
  var rounds = n > 400 ? 40 : 300;
  var temp = W / 8;
  for (var r = 0; r < rounds; r++) {
    nodes.forEach(function (p) { p.dx = 0; p.dy = 0; });
    for (var i = 0; i < n; i++) {
      for (var j = i + 1; j < n; j++) {
        var a = nodes[i], b = nodes[j];
        var x = a.x - b.x, y = a.y - b.y, dist = Math.sqrt(x * x + y * y) || 0.01;
        var f = k * k / dist;
        a.dx += x / dist * f; a.dy += y / dist * f; b.dx -= x / dist * f; b.dy -= y / dist * f;
      }
    }
    edges.forEach(function (l) {
      var a = byId[l.a], b = byId[l.b];
      var x = a.x - b.x, y = a.y - b.y, dist = Math.sqrt(x * x + y * y) || 0.01;
      var f = dist * dist / k;
      a.dx -= x / dist * f; a.dy -= y / dist * f; b.dx += x / dist * f; b.dy += y / dist * f;
    });
    nodes.forEach(function (p) {
      var len = Math.sqrt(p.dx * p.dx + p.dy * p.dy) || 0.01;
      p.x = Math.min(W - 40, Math.max(40, p.x + p.dx / len * Math.min(len, temp)));
      p.y = Math.min(H - 40, Math.max(40, p.y + p.dy / len * Math.min(len, temp)));
    });
    temp *= 0.97;
  }
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);

  function el(name, attrs, parent) {
    var e = document.createElementNS(SVGNS, name);
    Object.keys(attrs).forEach(function (key) { e.setAttribute(key, attrs[key]); });
    parent.appendChild(e);
    return e;
  }
  function title(parent, text) { el("title", {}, parent).textContent = text; }

  // Parallel links between one pair bend apart so each stays visible and hoverable.
  var pairCount = {}, pairSeen = {};
  edges.forEach(function (l) {
    var key = [l.a, l.b].sort().join("\u0000");
    pairCount[key] = (pairCount[key] || 0) + 1;
  });
  var linkLayer = el("g", { "class": "links" }, svg), nodeLayer = el("g", { "class": "nodes" }, svg);
  edges.forEach(function (l) {
    var a = byId[l.a], b = byId[l.b];
    var key = [l.a, l.b].sort().join("\u0000");
    var idx = pairSeen[key] = (pairSeen[key] || 0) + 1;
    var off = (idx - 1 - (pairCount[key] - 1) / 2) * 18;
    var mx = (a.x + b.x) / 2, my = (a.y + b.y) / 2, dx = b.x - a.x, dy = b.y - a.y;
    var len = Math.sqrt(dx * dx + dy * dy) || 1;
    var cx = mx - dy / len * off * 2, cy = my + dx / len * off * 2;
    var g = el("g", { "class": "link state-" + l.state, "data-uid": l.uid }, linkLayer);
    el("path", { d: "M" + a.x + "," + a.y + " Q" + cx + "," + cy + " " + b.x + "," + b.y }, g);
    title(g, "link " + l.uid + " (" + (l.kind || "link") + ", " + l.state + ")\n" +
      l.a + " " + l.a_intf + (l.a_ip ? " " + l.a_ip : "") + (l.a_shape ? " [" + l.a_shape + "]" : "") + "\n" +
      l.b + " " + l.b_intf + (l.b_ip ? " " + l.b_ip : "") + (l.b_shape ? " [" + l.b_shape + "]" : ""));
    [[a, b, l.a_intf], [b, a, l.b_intf]].forEach(function (end) {
      var t = el("text", { x: end[0].x + (end[1].x - end[0].x) * 0.22 + (cx - mx) * 0.3,
                           y: end[0].y + (end[1].y - end[0].y) * 0.22 + (cy - my) * 0.3, "class": "ifname" }, g);
      t.textContent = end[2];
    });
  });
  nodes.forEach(function (p) {
    var g = el("g", { "class": "node kind-" + p.d.kind, "data-name": p.d.id }, nodeLayer);
    el("circle", { cx: p.x, cy: p.y, r: 14 }, g);
    var t = el("text", { x: p.x, y: p.y + 28, "class": "label" }, g);
    t.textContent = p.d.id;
    var lines = [p.d.id + (p.d.loopback ? "  loopback " + p.d.loopback : "")];
    p.d.interfaces.forEach(function (f) { lines.push(f.name + (f.ip ? " " + f.ip : "") + " -> " + f.peer); });
    title(g, lines.join("\n"));
  });
  status.textContent = "ready: " + nodes.length + " nodes, " + edges.length + " links";
  status.setAttribute("data-state", "ready");
})();
"""
