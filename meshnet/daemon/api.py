"""The shim's door into meshnetd: HTTP/JSON over a unix socket (docs/internals.md has the protocol)."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from meshnet.cni import protocol

Handler = Callable[[str, Mapping[str, str], str], "dict[str, Any] | None"]


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    # socketserver's default backlog is 5: a node starting 20 pods at once overflowed it and the
    # shims got EAGAIN. The kernel caps this at net.core.somaxconn.
    request_queue_size = socket.SOMAXCONN


class ApiServer:
    def __init__(self, path: str, handle: Handler, health: Callable[[], dict[str, Any]],
                 log: Callable[..., None]) -> None:
        self.path = path
        sock_path = Path(path)
        sock_path.parent.mkdir(parents=True, exist_ok=True)
        if sock_path.is_socket():
            sock_path.unlink()  # left by a daemon that died; we are the node's only meshnetd

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are logged as structured events by the core

            def _reply(self, body: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/health":
                    self._reply({"ok": True, **health()})
                else:
                    self._reply({"ok": False, "error": "not found"}, 404)

            def do_POST(self) -> None:
                if self.path != "/v1/cni":
                    self._reply({"ok": False, "error": "not found"}, 404)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                version: str | None = None
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                    env = {str(k): str(v) for k, v in dict(body.get("env") or {}).items()}
                    stdin = str(body.get("stdin") or "")
                    version = protocol.version_hint(stdin)
                    command = str(body.get("command") or env.get("CNI_COMMAND", ""))
                    result = handle(command, env, stdin)
                    self._reply({"ok": True, "result": result})
                except Exception as e:  # every failure reaches the runtime as CNI error JSON
                    if not isinstance(e, protocol.CniError):
                        log(event="internal-error", error=f"{type(e).__name__}: {e}")
                    self._reply({"ok": False, "error": protocol.error_to_dict(e, version)})

        old_umask = os.umask(0o177)  # the socket is 0600: only root on the node may drive meshnetd
        try:
            self._server = _UnixHTTPServer(path, RequestHandler)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self._server.serve_forever, name="api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            if Path(self.path).is_socket():
                os.unlink(self.path)
        except OSError:
            pass


def health_check(path: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET /v1/health on a daemon's socket (for probes and `meshnetctl health`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"GET /v1/health HTTP/1.0\r\nHost: meshnetd\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise OSError(f"meshnetd answered {head.splitlines()[0]!r}")
    return dict(json.loads(body))
