"""`meshnetctl topo graph`: the data, a self-contained page, and the page in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meshnet.cli import main
from meshnet.model import load_manifest
from meshnet.topo.graph import graph_data, render_html
from meshnet.topo.routes import read_loopbacks

TESTS = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900"]


def test_data_has_every_pod_and_one_link_per_uid_with_addresses() -> None:
    data = graph_data(load_manifest(TESTS / "20node.yml"), read_loopbacks(TESTS / "20node.yml"))
    assert len(data["nodes"]) == 20 and len(data["links"]) == 24
    assert sorted(lk["uid"] for lk in data["links"]) == list(range(1, 25))
    q1 = next(n for n in data["nodes"] if n["id"] == "qrtr-1")
    assert q1["loopback"] == "192.0.2.1/32"
    assert all(f["ip"].startswith("100.64.") and f["name"].startswith("eth") for f in q1["interfaces"])
    assert {lk["state"] for lk in data["links"]} == {"planned"}


def test_macvlan_peers_become_external_nodes_and_live_states_colour_links() -> None:
    states = [{"uid": 1, "namespace": "default", "kind": "veth", "state": "up"},
              {"uid": 2, "namespace": "default", "kind": "macvlan", "state": "down"}]
    data = graph_data(load_manifest(TESTS / "macvlan.yml"), {}, states)
    kinds = {n["id"]: n["kind"] for n in data["nodes"]}
    assert kinds == {"r1": "pod", "r2": "pod", "host:eth0": "external"}
    assert {lk["uid"]: (lk["kind"], lk["state"]) for lk in data["links"]} == {1: ("veth", "up"), 2: ("macvlan", "down")}


def test_page_is_self_contained_and_escapes_its_data() -> None:
    data = graph_data(load_manifest(TESTS / "3node.yml"))
    data["nodes"][0]["loopback"] = "</script><script>alert(1)</script>"
    page = render_html(data, "a <b> title")
    assert "</script><script>alert" not in page
    assert "a &lt;b&gt; title" in page
    # Nothing is fetched: no src/href attributes, no stylesheet links, no URL but the SVG namespace.
    assert not re.search(r"\b(src|href)\s*=", page)
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"] * 2


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        # Debian's package; `make setup` installs it too.
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True,
                       timeout=900)
        found = shutil.which("chromium")
    assert found is not None, "chromium is not installed and could not be installed"
    return found


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_page_draws_every_node_and_link_in_headless_chromium(tmp_path: Path) -> None:
    html = tmp_path / "graph.html"
    assert main(["topo", "graph", str(TESTS / "20node.yml"), "-o", str(html)]) == 0
    chromium = _chromium()
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    # Elements the page's script creates: one group per node and per link, then the ready marker.
    status = re.search(r'<span id="status" data-state="(\w+)">([^<]*)<', dom)
    assert status is not None and status.groups() == ("ready", "ready: 20 nodes, 24 links"), status
    assert len(re.findall(r'<g class="node kind-pod"', dom)) == 20
    assert len(re.findall(r'<g class="link state-planned" data-uid="\d+"', dom)) == 24
    assert len(re.findall(r"<path d=\"M[\d.]+,[\d.]+ Q", dom)) == 24  # positions are numbers, not NaN
    # Hover text: pod with loopback and addressed interfaces, link with both ends.
    assert re.search(r"<title>qrtr-1  loopback 192\.0\.2\.1/32\neth1 100\.64\.\d+\.\d+/30 -&gt; qrtr-", dom)
    assert re.search(r"<title>link 1 \(link, planned\)\nqrtr-\d+ eth\d+ 100\.64\.0\.[12]/30\n", dom)
    png = tmp_path / "graph.png"
    subprocess.run([*base, f"--screenshot={png}", html.as_uri()], capture_output=True, timeout=120, check=True,
                   cwd=tmp_path)
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (1200, 900)
    assert png.stat().st_size > 20000  # a drawing, not an empty page


def test_links_show_what_leaves_each_end_declared_or_in_force() -> None:
    """Issue 15: the tooltip data carries each end's state and impairments (tests/wan.yml)."""
    data = graph_data(load_manifest(TESTS / "wan.yml"))
    by_uid = {lk["uid"]: lk for lk in data["links"]}
    nyc_lon = by_uid[3]
    assert (nyc_lon["a"], nyc_lon["a_shape"]) == ("lon", "delay 35ms, loss 1%, rate 10mbit") or \
           (nyc_lon["b"], nyc_lon["b_shape"]) == ("lon", "delay 35ms, loss 1%, rate 10mbit")
    # In a lab, what is in force wins (here: a node without netem, the end declared down).
    live = [{"uid": 3, "namespace": "default", "kind": "vxlan", "state": "down",
             "in_force": {"nyc": {"text": "down, rate 10mbit (delay, loss unavailable on this node)"}}}]
    lk = next(x for x in graph_data(load_manifest(TESTS / "wan.yml"), {}, live)["links"] if x["uid"] == 3)
    nyc_shape = lk["a_shape"] if lk["a"] == "nyc" else lk["b_shape"]
    assert nyc_shape == "down, rate 10mbit (delay, loss unavailable on this node)"
    assert "a_shape" in render_html(data, "wan")
