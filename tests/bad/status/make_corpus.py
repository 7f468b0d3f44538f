"""Writes tests/bad/status/*.yml: forged statuses of pod r2, one hostile field each.

Run `python tests/bad/status/make_corpus.py` after editing CASES and review `git diff`. Each file
is a Topology whose spec is valid (r2's link to r1) and whose status has one forged value; its
header says what the refusal must name (`# expect: FIELD`, `# object: Topology default/r2`).
Values too large for a readable file (megabyte strings, 5000-entry lists) are made in
tests/test_status_corpus.py instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CANARY = "/tmp/mnt-canary-status"
GOOD = {"src_ip": "198.51.100.2", "net_ns": "/var/run/netns/cni-2", "container_id": "c0ffee", "node": "node1",
        "vni_block": 7, "links": [{"uid": 1, "kind": "vxlan", "state": "up", "intf": "eth1"}]}
INJECT = f"\n[.] netns exec mnt-node touch {CANARY}"

# name -> (field the refusal names, {status key: forged value}); the rest of the status is GOOD.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "src-ip-newline-command": ("status.src_ip", {"src_ip": "198.51.100.2" + INJECT}),
    "src-ip-trailing-newline": ("status.src_ip", {"src_ip": "198.51.100.2\n"}),
    "src-ip-extra-words": ("status.src_ip", {"src_ip": "198.51.100.2 dev eth0"}),
    "src-ip-option": ("status.src_ip", {"src_ip": "-x"}),
    "src-ip-long-option": ("status.src_ip", {"src_ip": "--foo"}),
    "src-ip-with-prefix": ("status.src_ip", {"src_ip": "198.51.100.2/24"}),
    "src-ip-scope-smuggle": ("status.src_ip", {"src_ip": "fe80::1%eth0 dev lo"}),
    "src-ip-hostname": ("status.src_ip", {"src_ip": "node1.example.com"}),
    "src-ip-integer": ("status.src_ip", {"src_ip": 3325256706}),
    "src-ip-list": ("status.src_ip", {"src_ip": ["198.51.100.2"]}),
    "net-ns-host-pid1": ("status.net_ns", {"net_ns": "/proc/1/ns/net"}),
    "net-ns-proc-self": ("status.net_ns", {"net_ns": "/proc/self/ns/net"}),
    "net-ns-proc-thread-self": ("status.net_ns", {"net_ns": "/proc/thread-self/ns/net"}),
    "net-ns-proc-pid0": ("status.net_ns", {"net_ns": "/proc/0/ns/net"}),
    "net-ns-proc-mnt": ("status.net_ns", {"net_ns": "/proc/2/ns/mnt"}),
    "net-ns-dotdot": ("status.net_ns", {"net_ns": "/var/run/netns/../../proc/1/ns/net"}),
    "net-ns-subdir": ("status.net_ns", {"net_ns": "/var/run/netns/a/b"}),
    "net-ns-outside": ("status.net_ns", {"net_ns": "/etc/passwd"}),
    "net-ns-docker-dir": ("status.net_ns", {"net_ns": "/var/run/docker/netns/default"}),
    "net-ns-relative": ("status.net_ns", {"net_ns": "netns/cni-2"}),
    "net-ns-newline-command": ("status.net_ns", {"net_ns": "/var/run/netns/cni-2" + INJECT}),
    "net-ns-trailing-newline": ("status.net_ns", {"net_ns": "/var/run/netns/cni-2\n"}),
    "net-ns-space": ("status.net_ns", {"net_ns": "/var/run/netns/cni 2"}),
    "net-ns-option": ("status.net_ns", {"net_ns": "-x"}),
    "net-ns-mapping": ("status.net_ns", {"net_ns": {"path": "/var/run/netns/cni-2"}}),
    "container-id-newline": ("status.container_id", {"container_id": "c0ffee\nlink del eth0"}),
    "container-id-space": ("status.container_id", {"container_id": "c0 ffee"}),
    "container-id-option": ("status.container_id", {"container_id": "--foo"}),
    "container-id-path": ("status.container_id", {"container_id": "../../etc"}),
    "container-id-integer": ("status.container_id", {"container_id": 12}),
    "node-space": ("status.node", {"node": "node 1"}),
    "node-newline": ("status.node", {"node": "node1\n"}),
    "node-option": ("status.node", {"node": "-x"}),
    "node-uppercase": ("status.node", {"node": "Node1"}),
    "node-boolean": ("status.node", {"node": True}),
    "vni-block-string": ("status.vni_block", {"vni_block": "7"}),
    "vni-block-negative": ("status.vni_block", {"vni_block": -1}),
    "vni-block-huge": ("status.vni_block", {"vni_block": 2 ** 40}),
    "vni-block-boolean": ("status.vni_block", {"vni_block": True}),
    "vni-block-float": ("status.vni_block", {"vni_block": 1.5}),
    "links-not-a-list": ("status.links", {"links": "up"}),
    "links-item-string": ("status.links[0]", {"links": ["eth1"]}),
    "links-intf-newline-command": ("status.links[0].intf",
                                   {"links": [{"uid": 1, "kind": "vxlan", "state": "up", "intf": "eth1" + INJECT}]}),
    "links-intf-eth0": ("status.links[0].intf", {"links": [{"uid": 1, "kind": "veth", "state": "up", "intf": "eth0"}]}),
    "links-intf-lo": ("status.links[0].intf", {"links": [{"uid": 1, "kind": "veth", "state": "up", "intf": "lo"}]}),
    "links-intf-option": ("status.links[0].intf", {"links": [{"uid": 1, "kind": "veth", "state": "up", "intf": "-x"}]}),
    "links-intf-space": ("status.links[0].intf",
                         {"links": [{"uid": 1, "kind": "veth", "state": "up", "intf": "eth1 eth0"}]}),
    "links-intf-too-long": ("status.links[0].intf",
                            {"links": [{"uid": 1, "kind": "veth", "state": "up", "intf": "e" * 16}]}),
    "links-intf-keyword": ("status.links[0].intf",
                           {"links": [{"uid": 1, "kind": "veth", "state": "up", "intf": "dev"}]}),
    "links-uid-string": ("status.links[0].uid", {"links": [{"uid": "1", "kind": "veth", "state": "up"}]}),
    "links-uid-negative": ("status.links[0].uid", {"links": [{"uid": -1, "kind": "veth", "state": "up"}]}),
    "links-uid-huge": ("status.links[0].uid", {"links": [{"uid": 4096, "kind": "veth", "state": "up"}]}),
    "links-kind-unknown": ("status.links[0].kind", {"links": [{"uid": 1, "kind": "bridge", "state": "up"}]}),
    "links-admin-unknown": ("status.links[0].admin",
                            {"links": [{"uid": 1, "kind": "veth", "state": "up", "admin": "down; rm"}]}),
    "links-impairments-bad-delay": ("status.links[0].impairments.delay",
                                    {"links": [{"uid": 1, "kind": "veth", "state": "up",
                                                "impairments": {"delay": "20ms dev lo"}}]}),
    "links-impairments-unknown-field": ("status.links[0].impairments",
                                        {"links": [{"uid": 1, "kind": "veth", "state": "up",
                                                    "impairments": {"qdisc": "pfifo"}}]}),
    "links-unavailable-unknown": ("status.links[0].unavailable",
                                  {"links": [{"uid": 1, "kind": "veth", "state": "up", "unavailable": ["rate"]}]}),
    "links-state-unknown": ("status.links[0].state", {"links": [{"uid": 1, "kind": "veth", "state": "up; rm"}]}),
    "links-message-escape": ("status.links[0].message",
                             {"links": [{"uid": 1, "kind": "veth", "state": "error", "message": "\x1b[2Jgone"}]}),
    "links-message-integer": ("status.links[0].message",
                              {"links": [{"uid": 1, "kind": "veth", "state": "error", "message": 7}]}),
    "skipped-not-a-list": ("status.skipped", {"skipped": {"pod_name": "r1", "link_id": 1}}),
    "skipped-item-integer": ("status.skipped[0]", {"skipped": [1]}),
    "skipped-pod-newline": ("status.skipped[0].pod_name", {"skipped": [{"pod_name": "r1\nr3", "link_id": 1}]}),
    "skipped-pod-option": ("status.skipped[0].pod_name", {"skipped": [{"pod_name": "--foo", "link_id": 1}]}),
    "skipped-link-id-string": ("status.skipped[0].link_id", {"skipped": [{"pod_name": "r1", "link_id": "1"}]}),
    "plumbing-error-escape": ("status.plumbing_error", {"plumbing_error": "\x1b]0;owned\x07"}),
    "plumbing-error-integer": ("status.plumbing_error", {"plumbing_error": 1}),
    "status-not-a-mapping": ("status", {}),
}


def document(name: str) -> str:
    expect, forged = CASES[name]
    status: Any = "alive" if name == "status-not-a-mapping" else {**GOOD, **forged}
    topo = {"apiVersion": "networkop.co.uk/v1beta1", "kind": "Topology", "metadata": {"name": "r2"},
            "spec": {"links": [{"uid": 1, "peer_pod": "r1", "local_intf": "eth1", "peer_intf": "eth1"}]},
            "status": status}
    header = f"# expect: {expect}\n# object: Topology default/r2\n---\n"
    return header + yaml.safe_dump(topo, sort_keys=False, allow_unicode=False, width=200)


def main() -> int:
    for old in HERE.glob("*.yml"):
        if old.stem not in CASES:
            old.unlink()
    for name in CASES:
        (HERE / f"{name}.yml").write_text(document(name))
    print(f"{len(CASES)} corpus files in {HERE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
