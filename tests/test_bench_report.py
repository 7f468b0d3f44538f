"""The benchmark report (benchmarks/run.py): hand-written sections survive a regenerated report."""

from __future__ import annotations

from benchmarks.run import keep_kept_sections, rows_from


def test_a_regenerated_report_keeps_the_isp_section_before_the_raw_results() -> None:
    old = "# Performance\n\n## Results\nold\n## ISP-sized labs\n\nmeasured once: 95 s\n\n## Raw results\n```\n"
    new = "# Performance\n\n## Results\nnew\n## Raw results\n```\n"
    merged = keep_kept_sections(old, new)
    assert merged == new.replace("## Raw", "## ISP-sized labs\n\nmeasured once: 95 s\n\n## Raw")
    assert keep_kept_sections(new, new) == new
    assert keep_kept_sections(merged, merged) == merged  # never twice


def test_isp_rows_name_nodes_store_and_targets() -> None:
    r = {"routers": 750, "links": 900, "nodes": 3, "store": "sqlite", "per_link_ms": 100.0, "figure_s": 90.0,
         "floor_s": 9.0, "ratio": 10.0, "down_s": 30.0, "routes_compute_s": 2.0, "routes_install_s": 9.0,
         "peak_rss_mib": 130.0, "idle_cpu_per_daemon_pct": 5.0}
    rows = rows_from({"isp3s": r})
    assert len(rows) == 4 and all("750 routers, 900 links, 3 nodes, sqlite" in row["what"] for row in rows)
    assert [row["verdict"] for row in rows] == ["(reported)", "**MISSED**", "met", "**MISSED**"]


def test_isp_rows_show_the_small_lab_per_link_and_the_daemons_ip_processes() -> None:
    r = {"routers": 200, "links": 240, "nodes": 3, "store": "kube", "per_link_ms": 50.0, "figure_s": 12.0,
         "floor_s": 3.0, "ratio": 4.0, "down_s": 3.0, "routes_compute_s": 0.2, "routes_install_s": 1.0,
         "peak_rss_mib": 90.0, "idle_cpu_per_daemon_pct": 3.0, "idle_cpu_children_pct": 1.5,
         "small": {"routers": 40, "links": 48, "figure_s": 1.5, "per_link_ms": 31.2}}
    rows = rows_from({"isp3k": r})
    assert "50.0 ms per link; 31.2 ms per link at 40 routers" in rows[0]["what"]
    assert rows[1]["figure"] == "50.0 vs 31.2 ms" and rows[1]["ratio"] == "1.60×"
    assert rows[1]["verdict"] == "**MISSED**"  # 1.6× dearer per link: not flat
    assert "3.0 % of a core (1.5 % in its `ip` processes)" in rows[4]["figure"]
    assert rows[2]["verdict"] == "met"
    r["small"] = {**r["small"], "per_link_ms": 45.0}  # 1.11×: flat within this machine's noise
    assert rows_from({"isp3k": r})[1]["verdict"] == "met"
    # The small lab timed several times: its median, with the range.
    r["small"] = {**r["small"], "per_link_ms_runs": [41.0, 45.0, 52.5]}
    assert "45.0 ms per link at 40 routers, median of 3: 41.0–52.5" in rows_from({"isp3k": r})[0]["what"]


def test_isp_up_is_judged_against_twice_the_floor_plus_the_delegate_timed_alone() -> None:
    r = {"routers": 750, "links": 900, "nodes": 3, "store": "sqlite", "per_link_ms": 26.0, "figure_s": 23.4,
         "floor_s": 7.4, "ratio": 3.2, "down_s": 0.6, "routes_compute_s": 2.0, "routes_install_s": 9.0,
         "peak_rss_mib": 90.0, "idle_cpu_per_daemon_pct": 1.0, "delegate_s": 9.0, "target_s": 23.8}
    up = rows_from({"isp3s": r})[0]
    assert up["target"] == "≤ 2× floor + eth0 delegate (9.000 s alone) = 23.800 s"
    assert up["verdict"] == "met"
    assert rows_from({"isp3s": {**r, "target_s": 20.0}})[0]["verdict"] == "**MISSED**"


def test_the_figures_are_judged_against_issue_14s_raised_targets() -> None:
    results = {"add": {"figure_s": 0.030, "floor_s": 0.013},  # 1.5 × 13 + 10 = 29.5 ms
               "links1": {"figure_s": 1.30, "floor_s": 1.0, "ratio": 1.30, "peak_rss_mib": 59.0},
               "links2": {"figure_s": 1.31, "floor_s": 1.0, "ratio": 1.31, "peak_rss_mib": 61.0},
               "random": {"figure_s": 3.0, "floor_s": 2.0, "peak_rss_mib": 50.0}}
    rows = {row["what"].split(":")[0].split(" (")[0]: row for row in rows_from(results)}
    assert rows["CNI ADD of a pod with 4 links, peers up"]["verdict"] == "**MISSED**"
    assert "30 ms (wave 1: + 40 ms)" in rows["CNI ADD of a pod with 4 links, peers up"]["target"]
    assert rows["2 pods × 1500 links, one node"]["verdict"] == "met"
    assert rows["2 pods × 1500 links, two nodes"]["verdict"] == "**MISSED**"
    assert rows["100 pods, 300 links"]["verdict"] == "met"
    assert rows["peak RSS of meshnetd"]["verdict"] == "**MISSED**"
    assert rows["peak RSS of meshnetd"]["figure"] == "61.0 MiB"


def test_a_lab_figure_is_the_median_of_its_rounds_and_the_peak_rss_the_highest() -> None:
    from benchmarks.lab_bench import _rounds

    runs = iter([{"figure_s": 3.1, "floor_s": 1.3, "peak_rss_mib": 58.0, "batches": 684},
                 {"figure_s": 2.5, "floor_s": 2.1, "peak_rss_mib": 61.5, "batches": 683},
                 {"figure_s": 2.7, "floor_s": 1.4, "peak_rss_mib": 59.0, "batches": 685}])
    r = _rounds(lambda: next(runs), 3)
    assert (r["figure_s"], r["floor_s"], r["ratio"], r["peak_rss_mib"]) == (2.7, 1.4, 1.93, 61.5)
    assert r["batches"] == 685  # the middle run's own details
    assert (r["figure_runs_s"], r["floor_runs_s"]) == ([3.1, 2.5, 2.7], [1.3, 2.1, 1.4])
    row = next(x for x in rows_from({"random": r}) if x["what"].startswith("100 pods"))
    assert "(median of 3 labs: 2.500–3.100 s, floors 1.300–2.100 s)" in row["what"]


def test_an_isp_floor_shows_the_range_of_its_replays() -> None:
    r = {"routers": 750, "links": 900, "nodes": 3, "store": "sqlite", "per_link_ms": 26.0, "figure_s": 23.4,
         "floor_s": 9.1, "floor_runs_s": [8.2, 9.1, 10.7], "ratio": 2.6, "down_s": 0.6, "routes_compute_s": 2.0,
         "routes_install_s": 9.0, "peak_rss_mib": 90.0, "idle_cpu_per_daemon_pct": 1.0}
    assert rows_from({"isp3s": r})[0]["floor"] == "9.100 s (median of 3: 8.200–10.700 s)"


def test_the_100_pod_row_is_followed_by_what_the_floor_leaves_out() -> None:
    r = {"figure_s": 2.6, "floor_s": 1.3, "peak_rss_mib": 50.0,
         "outside_s": {"delegate": 0.9, "cni_starts": 0.6, "sandboxes": 0.3,
                       "cpu_s": {"delegate": 1.5, "cni_starts": 1.0, "sandboxes": 0.25}}}
    rows = rows_from({"random": r})
    out = next(x for x in rows if x["what"].startswith("100 pods: what the figure carries"))
    assert out["figure"] == "1.800 s (2.75 CPU-s)"
    assert "eth0 delegate 0.900 s, CNI binary starts 0.600 s, sandboxes 0.300 s" in out["what"]
    assert out["target"] == "(reported; 1.5× floor = 1.950 s)"
