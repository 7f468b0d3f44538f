"""`meshnetctl init-wait N`: returns once the namespace has N interfaces besides lo; clear timeout otherwise."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meshnet.initwait import InitWaitTimeout, wait_for_interfaces
from tests.netns import ip, netns_set

MESHNETCTL = str(Path(sys.executable).parent / "meshnetctl")


def test_counts_everything_but_lo(tmp_path: Path) -> None:
    for name in ("lo", "eth0", "net1"):
        (tmp_path / name).mkdir()
    assert wait_for_interfaces(2, timeout=1, sleep=0.01, sys_class_net=tmp_path) == ["eth0", "net1"]
    with pytest.raises(InitWaitTimeout, match=r"timed out after 0.2s with 2 of 3 interfaces besides lo \(eth0, net1\)"):
        wait_for_interfaces(3, timeout=0.2, sleep=0.05, sys_class_net=tmp_path)


def _one_interface(home: str, target: str, name: str) -> None:
    """One interface in `target`: a veth whose other end stays in `home` (no dummy module here)."""
    ip("-n", home, "link", "add", f"peer-{name}"[:15], "type", "veth", "peer", "name", name, "netns", target)


@pytest.mark.root
def test_waits_in_a_real_namespace_until_the_interfaces_arrive() -> None:
    with netns_set(2) as (ns, other):
        proc = subprocess.Popen(["ip", "netns", "exec", ns, MESHNETCTL, "init-wait", "2", "--timeout", "20",
                                 "--sleep", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def add_later() -> None:
            time.sleep(0.8)
            _one_interface(other, ns, "eth0")
            time.sleep(0.3)
            _one_interface(other, ns, "e1-odd_name")

        adder = threading.Thread(target=add_later)
        started = time.monotonic()
        adder.start()
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            adder.join()
        assert proc.returncode == 0, err
        assert time.monotonic() - started >= 1.0  # it did wait for the second interface
        assert out.strip() == "init-wait: 2 interfaces: e1-odd_name eth0"
        assert "0/2 interfaces" in err


@pytest.mark.root
def test_times_out_in_a_real_namespace_with_exit_1() -> None:
    with netns_set(2) as (ns, other):
        _one_interface(other, ns, "eth0")
        started = time.monotonic()
        proc = subprocess.run(["ip", "netns", "exec", ns, MESHNETCTL, "init-wait", "2", "--timeout", "2",
                               "--sleep", "0.2"], capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 1
        assert 2 <= time.monotonic() - started < 10
        assert "init-wait: timed out after 2s with 1 of 2 interfaces besides lo (eth0)" in proc.stderr
