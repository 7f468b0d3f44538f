"""The CNI shim against a small fake meshnetd on a unix socket (no root needed)."""

from __future__ import annotations

import io
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from meshnet.cni import protocol, results
from meshnet.cni.shim import dispatch

REPO = Path(__file__).resolve().parent.parent
RESULT_100 = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
    "ips": [{"interface": 0, "address": "203.0.113.5/24", "gateway": "203.0.113.1"}],
    "dns": {},
}

Reply = Callable[[dict[str, Any]], tuple[int, bytes]]


class _Handler(BaseHTTPRequestHandler):
    server: FakeDaemon

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "body": body})
        self.server.release.wait(10)
        status, payload = self.server.reply(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence: the default logger indexes client_address, which a unix socket leaves empty."""


class FakeDaemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """meshnetd's CNI endpoint as the shim sees it; ``reply`` decides the answer, ``requests`` records."""

    daemon_threads = True

    def __init__(self, path: str) -> None:
        super().__init__(path, _Handler)
        self.requests: list[dict[str, Any]] = []
        self.reply: Reply = lambda body: (200, json.dumps({"ok": True, "result": None}).encode())
        self.release = threading.Event()
        self.release.set()

    @property
    def sock(self) -> str:
        return str(self.server_address)

    def answer(self, payload: dict[str, Any], status: int = 200) -> None:
        self.reply = lambda body: (status, json.dumps(payload).encode())


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    server = FakeDaemon(str(tmp_path / "meshnet.sock"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


def _conf(sock: str, version: str = "1.0.0", **extra: Any) -> str:
    return json.dumps({"cniVersion": version, "name": "meshnet-net", "type": "meshnet", "daemon_socket": sock, **extra})


def _env(command: str, **extra: str) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/mnt-pod",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME=r1",
        "CNI_PATH": "/usr/lib/cni:/opt/cni/bin",
    }
    env.update(extra)
    return env


def _run(env: dict[str, str], stdin: str | bytes) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = dispatch(env, stdin, out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("version", protocol.SUPPORTED_VERSIONS)
def test_version_is_answered_locally_with_daemon_down(tmp_path: Path, version: str) -> None:
    code, out, _ = _run({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": version}))
    assert code == 0
    assert json.loads(out) == {"cniVersion": version, "supportedVersions": list(protocol.SUPPORTED_VERSIONS)}


def test_version_without_stdin_answers_latest() -> None:
    code, out, _ = _run({"CNI_COMMAND": "VERSION"}, b"")
    assert code == 0
    assert json.loads(out)["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("version", protocol.SUPPORTED_VERSIONS)
def test_add_prints_daemon_result_and_forwards_env_and_stdin(daemon: FakeDaemon, version: str) -> None:
    result = {**results.convert_result(RESULT_100, version)}
    daemon.answer({"ok": True, "result": result})
    stdin = _conf(daemon.sock, version)
    env = {**_env("ADD"), "HOME": "/root", "UNRELATED": "x"}
    code, out, err = _run(env, stdin)
    assert code == 0, out
    assert json.loads(out) == result
    assert out.count("\n") == 1  # stdout carries the result and nothing else
    [request] = daemon.requests
    assert request["path"] == "/v1/cni"
    assert request["body"] == {"command": "ADD", "env": _env("ADD"), "stdin": stdin}
    assert json.loads(err.splitlines()[-1])["result"] == "ok"


@pytest.mark.parametrize(
    ("command", "version"),
    [("DEL", v) for v in protocol.SUPPORTED_VERSIONS]
    + [("CHECK", v) for v in ("0.4.0", "1.0.0", "1.1.0")]
    + [("STATUS", "1.1.0"), ("GC", "1.1.0")],
)
def test_commands_without_result_print_nothing(daemon: FakeDaemon, command: str, version: str) -> None:
    extra = {protocol.VALID_ATTACHMENTS_KEY: [{"containerID": "c0ffee", "ifname": "eth0"}]} if command == "GC" else {}
    env = {"CNI_COMMAND": command, "CNI_PATH": "/usr/lib/cni"} if command in ("STATUS", "GC") else _env(command)
    code, out, _ = _run(env, _conf(daemon.sock, version, **extra))
    assert (code, out) == (0, "")
    assert daemon.requests[0]["body"]["command"] == command


def test_daemon_error_is_printed_with_its_code(daemon: FakeDaemon) -> None:
    error = {"cniVersion": "0.4.0", "code": 101, "msg": "link plumbing failed", "details": "eth1: File exists"}
    daemon.answer({"ok": False, "error": error})
    code, out, err = _run(_env("ADD"), _conf(daemon.sock, "0.4.0"))
    assert code == 1
    assert json.loads(out) == error
    assert json.loads(err.splitlines()[-1])["error"]["code"] == 101


@pytest.mark.parametrize(
    ("status", "payload"),
    [(500, b'{"ok": true}'), (200, b"not json"), (200, b'{"result": {}}'), (404, b"")],
)
def test_invalid_daemon_answer_is_internal_error(daemon: FakeDaemon, status: int, payload: bytes) -> None:
    daemon.reply = lambda body: (status, payload)
    code, out, _ = _run(_env("ADD"), _conf(daemon.sock))
    answer = json.loads(out)
    assert code == 1
    assert answer["code"] == 999
    assert daemon.sock in answer["details"]


def test_missing_socket_is_try_again_later_naming_it(tmp_path: Path) -> None:
    sock = str(tmp_path / "nowhere.sock")
    code, out, _ = _run(_env("ADD"), _conf(sock, topology_index=str(tmp_path / "no-index.json")))
    answer = json.loads(out)
    assert code == 1
    assert answer["code"] == protocol.TRY_AGAIN_LATER
    assert sock in answer["details"]
    assert answer["cniVersion"] == "1.0.0"


def _dead_socket(path: Path) -> str:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()  # the file stays, nobody listens: connect() is refused
    return str(path)


def test_refused_socket_is_try_again_later_naming_it(tmp_path: Path) -> None:
    sock = _dead_socket(tmp_path / "dead.sock")
    code, out, _ = _run(_env("CHECK"), _conf(sock))
    answer = json.loads(out)
    assert (code, answer["code"]) == (1, 11)
    assert sock in answer["details"]
    assert "refused" in answer["details"].lower()


def test_daemon_timeout_is_try_again_later(daemon: FakeDaemon) -> None:
    daemon.release.clear()  # the fake daemon accepts but does not answer
    code, out, _ = _run(_env("ADD"), _conf(daemon.sock, daemon_timeout=0.2))
    answer = json.loads(out)
    assert (code, answer["code"]) == (1, 11)
    assert "timed out" in answer["details"]
    assert daemon.sock in answer["details"]


def _full_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: the next non-blocking connect() gets EAGAIN."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    fillers = []
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(str(path))
        except BlockingIOError:
            c.close()
            return listener, fillers
        fillers.append(c)


def test_full_accept_queue_is_waited_for_not_failed(tmp_path: Path) -> None:
    """20 pods at once on a node overflowed meshnetd's backlog; the shim must queue, not fail."""
    from meshnet.cni.shim import _connect

    path = tmp_path / "busy.sock"
    listener, fillers = _full_listener(path)

    def drain_later() -> None:
        threading.Event().wait(0.3)
        for _ in fillers:
            listener.accept()[0].close()

    drainer = threading.Thread(target=drain_later)
    drainer.start()
    try:
        sock = _connect(str(path), 5.0)
        sock.close()
    finally:
        drainer.join()
        for c in fillers:
            c.close()
        listener.close()


def test_accept_queue_full_until_the_timeout_is_try_again_later(tmp_path: Path) -> None:
    path = tmp_path / "stuck.sock"
    listener, fillers = _full_listener(path)
    try:
        code, out, _ = _run(_env("ADD"), _conf(str(path), daemon_timeout=0.3,
                                               topology_index=str(tmp_path / "no-index.json")))
    finally:
        for c in fillers:
            c.close()
        listener.close()
    answer = json.loads(out)
    assert (code, answer["code"]) == (1, protocol.TRY_AGAIN_LATER)
    assert str(path) in answer["details"]
    assert "accept queue full" in answer["details"]


def test_meshnetd_listens_with_the_kernel_backlog_not_socketservers_five() -> None:
    from meshnet.daemon.api import _UnixHTTPServer

    assert _UnixHTTPServer.request_queue_size >= 128


def test_status_with_daemon_down_is_plugin_not_available(tmp_path: Path) -> None:
    sock = str(tmp_path / "nowhere.sock")
    code, out, _ = _run({"CNI_COMMAND": "STATUS"}, _conf(sock, "1.1.0"))
    answer = json.loads(out)
    assert (code, answer["code"]) == (1, protocol.PLUGIN_NOT_AVAILABLE)
    assert sock in answer["details"]


@pytest.mark.parametrize(
    ("env", "stdin", "code", "needle"),
    [
        ({}, "{}", 4, "CNI_COMMAND"),
        ({"CNI_COMMAND": "FROB"}, "{}", 4, "FROB"),
        (_env("ADD", CNI_NETNS=""), None, 4, "CNI_NETNS"),
        (_env("ADD", CNI_CONTAINERID=""), None, 4, "CNI_CONTAINERID"),
        (_env("DEL", CNI_IFNAME=""), None, 4, "CNI_IFNAME"),
        (_env("CHECK", CNI_PATH=""), None, 4, "CNI_PATH"),
        (_env("ADD", CNI_ARGS="K8S_POD_NAME"), None, 4, "CNI_ARGS"),
        (_env("ADD"), "{not json", 6, "decode"),
        (_env("ADD"), b"\xff\xfe", 6, "decode"),
        (_env("ADD"), '{"name": "n", "type": "meshnet"}', 7, "cniVersion"),
        (_env("ADD"), '{"cniVersion": "1.0.0", "type": "meshnet"}', 7, "name"),
        (_env("ADD"), '{"cniVersion": "1.0.0", "name": "n"}', 7, "type"),
        (_env("ADD"), '{"cniVersion": "0.2.0", "name": "n", "type": "meshnet"}', 1, "incompatible"),
        (_env("CHECK"), '{"cniVersion": "0.3.1", "name": "n", "type": "meshnet"}', 1, "CHECK"),
    ],
)
def test_invalid_calls_fail_before_the_daemon(
    daemon: FakeDaemon, env: dict[str, str], stdin: str | bytes | None, code: int, needle: str
) -> None:
    rc, out, _ = _run(env, _conf(daemon.sock) if stdin is None else stdin)
    answer = json.loads(out)
    assert rc == 1
    assert answer["code"] == code
    assert needle.lower() in (answer["msg"] + answer.get("details", "")).lower()
    assert daemon.requests == []


def test_error_answers_in_the_config_version(tmp_path: Path) -> None:
    code, out, _ = _run(_env("ADD", CNI_NETNS=""), _conf(str(tmp_path / "x.sock"), "0.3.1"))
    assert code == 1
    assert json.loads(out)["cniVersion"] == "0.3.1"


def test_log_file_gets_one_json_line_per_call(daemon: FakeDaemon, tmp_path: Path) -> None:
    log = tmp_path / "shim.log"
    stdin = _conf(daemon.sock, log_file=str(log))
    _run(_env("ADD"), stdin)
    daemon.answer({"ok": False, "error": {"code": 102, "msg": "store unavailable"}})
    _run(_env("ADD"), stdin)
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert (first["level"], first["command"], first["container_id"]) == ("info", "ADD", "c0ffee")
    assert (second["level"], second["error"]["code"]) == ("error", 102)


def test_unwritable_log_file_does_not_fail_the_call(daemon: FakeDaemon, tmp_path: Path) -> None:
    stdin = _conf(daemon.sock, log_file=str(tmp_path / "missing-dir" / "x.log"))
    code, out, err = _run(_env("DEL"), stdin)
    assert (code, out) == (0, "")
    assert "log_file" in err


def _subprocess_shim(env: dict[str, str], stdin: str) -> subprocess.CompletedProcess[str]:
    # -S -E: no site-packages and no PYTHON* variables, so a third-party import would fail here.
    return subprocess.run(
        [sys.executable, "-S", "-E", "-m", "meshnet.cni.shim"],
        input=stdin,
        env={**env, "PATH": os.environ.get("PATH", "/usr/bin")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_subprocess_add_like_a_runtime(daemon: FakeDaemon) -> None:
    daemon.answer({"ok": True, "result": RESULT_100})
    proc = _subprocess_shim(_env("ADD"), _conf(daemon.sock))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == RESULT_100
    assert daemon.requests[0]["body"]["env"]["CNI_ARGS"] == _env("ADD")["CNI_ARGS"]


def test_subprocess_dead_daemon_and_version(tmp_path: Path) -> None:
    sock = _dead_socket(tmp_path / "dead.sock")
    proc = _subprocess_shim(_env("ADD"), _conf(sock, topology_index=str(tmp_path / "no-index.json")))
    assert proc.returncode == 1
    answer = json.loads(proc.stdout)
    assert answer["code"] == 11
    assert sock in answer["details"]
    assert json.loads(proc.stderr.splitlines()[-1])["level"] == "error"
    proc = _subprocess_shim({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "0.3.1"}')
    assert (proc.returncode, json.loads(proc.stdout)["cniVersion"]) == (0, "0.3.1")


def test_shim_loads_nothing_but_the_standard_library_with_site_packages_in_reach() -> None:
    # Under -S (above) a third-party import would fail; here site-packages are on the path, so one
    # would load and show. Compared with what the interpreter had loaded before the import, the
    # shim adds only standard-library modules and its own three (import-linter checks the imports
    # it can see; this checks what really loads).
    code = (
        "import sys, site; sys.path[:0] = [sys.argv[1]]; sys.path.extend(site.getsitepackages()); "
        "before = set(sys.modules); import meshnet.cni.shim; "
        "print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    proc = subprocess.run([sys.executable, "-S", "-E", "-c", code, str(REPO)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    loaded = proc.stdout.split()
    assert "meshnet.cni.shim" in loaded
    own = {"meshnet", "meshnet.cni", "meshnet.cni.protocol", "meshnet.cni.shim", "meshnet.cni.wirejson"}
    foreign = [m for m in loaded if m not in own and m.split(".")[0] not in sys.stdlib_module_names]
    assert foreign == []


def test_shim_imports_only_the_standard_library_and_protocol() -> None:
    code = (
        "import sys, meshnet.cni.shim; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'meshnet'));"
        "print('http.client' in sys.modules, 'typing' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-E", "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    modules, lazy = proc.stdout.splitlines()
    assert modules == str(["meshnet", "meshnet.cni", "meshnet.cni.protocol", "meshnet.cni.shim",
                           "meshnet.cni.wirejson"])
    # Both are deferred so that a dead-daemon answer stays near bare interpreter start-up.
    assert lazy == "False False"
