"""Start-up latency of the CNI shim when meshnetd is down: the cost every pod start pays at least.

Runs ``python -S -E -m meshnet.cni.shim`` (no site-packages: what a standalone build runs) with an
ADD whose ``daemon_socket`` is a unix socket file nobody listens on, and reports wall-clock ms.
Usage: ``python -m benchmarks.shim_latency [runs]``.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _dead_socket(directory: str) -> str:
    # Bound, then closed: the file stays and connect() is refused, as after a daemon crash.
    path = os.path.join(directory, "meshnet.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()
    return path


def measure(runs: int = 20) -> dict[str, Any]:
    """Median/min/max wall-clock ms of ``runs`` shim calls against a dead daemon socket."""
    with tempfile.TemporaryDirectory(prefix="mnb-shim-") as tmp:
        # No topology index: the shim must answer 11 (its fallback only reads the missing file).
        conf = {"cniVersion": "1.0.0", "name": "meshnet", "type": "meshnet", "daemon_socket": _dead_socket(tmp),
                "topology_index": os.path.join(tmp, "topologies.json")}
        env = {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": "bench",
            "CNI_NETNS": "/var/run/netns/mnb-none",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "/usr/lib/cni",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        argv = [sys.executable, "-S", "-E", "-m", "meshnet.cni.shim"]
        stdin = json.dumps(conf).encode()
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            proc = subprocess.run(argv, input=stdin, env=env, cwd=REPO, capture_output=True, check=False)
            samples.append((time.perf_counter() - started) * 1000)
            answer = json.loads(proc.stdout)
            if proc.returncode != 1 or answer.get("code") != 11:
                raise RuntimeError(f"shim did not report a dead daemon: {proc.returncode} {proc.stdout!r}")
        bare = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-S", "-E", "-c", "pass"], check=True)
            bare.append((time.perf_counter() - started) * 1000)
    return {
        "runs": runs,
        "median_ms": round(statistics.median(samples), 1),
        "min_ms": round(min(samples), 1),
        "max_ms": round(max(samples), 1),
        "bare_python_median_ms": round(statistics.median(bare), 1),
    }


def binary_version(runs: int = 25) -> dict[str, Any]:
    """The standalone binary (scripts/build-cni-binary, cached in build/) answering VERSION with no
    Python on its PATH, beside the same shim on a bare interpreter; median ms of each."""
    out = REPO / "build" / "cni-binary"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build-cni-binary"), str(out)], check=True,
                   capture_output=True)
    env = {"PATH": "/nonexistent", "CNI_COMMAND": "VERSION"}
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "meshnet"}).encode()
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from meshnet.cni import shim; sys.exit(shim.main())"
    interpreted = [sys.executable, "-S", "-E", "-c", code]
    samples: dict[str, list[float]] = {"binary": [], "interpreted": []}
    for _ in range(runs):  # alternating, so both see the same machine load
        for name, argv in (("binary", [str(out / "meshnet")]), ("interpreted", interpreted)):
            started = time.perf_counter()
            subprocess.run(argv, input=stdin, env=env, capture_output=True, check=True)
            samples[name].append((time.perf_counter() - started) * 1000)
    binary = statistics.median(samples["binary"])
    return {"runs": runs, "binary_median_ms": round(binary, 1),
            "interpreted_median_ms": round(statistics.median(samples["interpreted"]), 1),
            "target_ms": 60, "ok": binary < 60}


if __name__ == "__main__":
    result = measure(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
    print(
        f"{result['median_ms']} ms median over {result['runs']} runs (bare python -S: "
        f"{result['bare_python_median_ms']} ms; min {result['min_ms']}, max {result['max_ms']})"
    )
