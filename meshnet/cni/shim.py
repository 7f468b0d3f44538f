"""The ``meshnet`` CNI binary: answer VERSION, forward everything else to the local meshnetd.

Standard library only and imported on every pod start, so imports are kept to the minimum: the
HTTP exchange with meshnetd is written out by hand rather than through ``http.client``.
"""

from __future__ import annotations

# The C module, not `socket`: the wrapper imports enum and selectors (~6 ms on every pod start)
# for conveniences a single unix-socket request does not use.
import _socket
import os
import sys
import time

from meshnet.cni import protocol
from meshnet.cni import wirejson as json  # `json`'s API without its ~15 ms of imports

# typing costs ~5 ms of start-up on every pod and is only needed by type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, TextIO

API_PATH = "/v1/cni"


class DaemonUnreachable(protocol.CniError):
    """meshnetd could not be reached (error 11). ``connected``: the request may have reached it."""

    def __init__(self, msg: str, details: str, connected: bool = False) -> None:
        super().__init__(protocol.TRY_AGAIN_LATER, msg, details)
        self.connected = connected


def _connect(path: str, timeout: float) -> _socket.socket:
    """Connect to meshnetd, waiting up to ``timeout`` while its accept queue is full.

    With a timeout set the socket is non-blocking, and a unix socket whose listen backlog is full
    answers EAGAIN at once instead of queueing the caller (TCP would wait). A node starting many
    pods at once hits exactly that, so EAGAIN means "busy, ask again" until the deadline.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError as exc:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonUnreachable(
                    "meshnetd is not reachable", f"cannot connect to {path}: busy (accept queue full) for {timeout:g} s"
                ) from exc
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)
        except OSError as exc:
            sock.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise DaemonUnreachable("meshnetd is not reachable", f"cannot connect to {path}: {reason}") from exc


def _post(sock: _socket.socket, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.0 exchange on the connected socket: meshnetd closes it after its answer.

    Written by hand on purpose: `http.client` (and the email parser it pulls in) costs 25-40 ms of
    imports on every pod start, for a request whose shape never changes.
    """
    head = f"POST {API_PATH} HTTP/1.0\r\nHost: meshnetd\r\nContent-Type: application/json\r\n"
    chunks = []
    try:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        raise DaemonUnreachable("meshnetd did not answer", f"request to {path} failed: {reason}",
                                connected=True) from exc
    finally:
        sock.close()
    raw = b"".join(chunks)
    header, _, payload = raw.partition(b"\r\n\r\n")
    status_line = header.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/") or not status_line[1].isdigit():
        raise DaemonUnreachable("meshnetd did not answer", f"{path}: no HTTP answer: {raw[:80]!r}", connected=True)
    return int(status_line[1]), payload


def call_daemon(conf: protocol.NetConf, command: str, env: Mapping[str, str], stdin: str) -> Any:
    """POST the call to meshnetd and return its ``result``; its error comes back as a CniError."""
    sock_path = conf.daemon_socket
    body = json.dumps(
        {
            "command": command,
            "env": {k: env[k] for k in protocol.ENV_VARS if k in env},
            "stdin": stdin,
        }
    ).encode()
    try:
        sock = _connect(sock_path, conf.daemon_timeout)
    except protocol.CniError as exc:
        if command == "STATUS":
            # STATUS is exactly the question "can you serve ADD?"; the spec has a code for "no".
            raise protocol.CniError(protocol.PLUGIN_NOT_AVAILABLE, exc.msg, exc.details) from exc
        raise
    status, raw = _post(sock, sock_path, body)
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if status != 200 or not isinstance(answer, dict) or "ok" not in answer:
        raise protocol.CniError(
            protocol.INTERNAL, "invalid answer from meshnetd", f"{sock_path}: HTTP {status}: {raw[:200]!r}"
        )
    if answer["ok"]:
        return answer.get("result")
    error = answer.get("error")
    raise protocol.CniError.from_dict(error if isinstance(error, dict) else {})


class _EventLog:
    """One JSON line per event on stderr and, once the config names one, in ``log_file``."""

    def __init__(self, stderr: TextIO) -> None:
        self.stderr = stderr
        self.log_file: str | None = None

    def write(self, **event: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 3), "component": "meshnet-cni", **event})
        self.stderr.write(line + "\n")
        if self.log_file:
            try:
                with open(self.log_file, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError as exc:
                # A broken log path must never fail pod networking; say so where someone looks.
                self.stderr.write(json.dumps({"level": "warning", "msg": f"log_file: {exc}"}) + "\n")


def _decode(stdin: bytes | str) -> str:
    if isinstance(stdin, str):
        return stdin
    try:
        return stdin.decode()
    except UnicodeDecodeError as exc:
        raise protocol.CniError(protocol.DECODING_FAILURE, "failed to decode network config", str(exc)) from exc


def dispatch(env: Mapping[str, str], stdin: bytes | str, stdout: TextIO, stderr: TextIO) -> int:
    """Run one CNI call: env, config and streams are passed in; returns the exit code."""
    started = time.monotonic()
    log = _EventLog(stderr)
    command = env.get("CNI_COMMAND", "")
    cni_version: str | None = None
    try:
        text = _decode(stdin)
        cni_version = protocol.version_hint(text)
        command = protocol.parse_command(env)
        if command == "VERSION":
            stdout.write(json.dumps(protocol.version_answer(text)) + "\n")
            return 0
        request = protocol.parse_request(env, text)
        log.log_file = request.conf.log_file
        try:
            result = call_daemon(request.conf, command, env, text)
        except DaemonUnreachable as exc:
            # DEL must complete whatever the daemon did with it; an ADD it may have begun is not
            # done twice: the runtime's DEL and retry sort that out.
            if command != "DEL" and not (command == "ADD" and not exc.connected):
                raise
            from meshnet.cni import offline  # only without the daemon: the happy path never pays

            result = offline.serve(request, env, exc, log.write)
        if result is not None:
            stdout.write(json.dumps(result) + "\n")
    except Exception as exc:
        error = protocol.error_to_dict(exc, cni_version)
        stdout.write(json.dumps(error) + "\n")
        log.write(
            level="error",
            command=command,
            container_id=env.get("CNI_CONTAINERID", ""),
            ms=round((time.monotonic() - started) * 1000, 1),
            error=error,
        )
        return 1
    log.write(
        level="info",
        command=command,
        container_id=env.get("CNI_CONTAINERID", ""),
        ms=round((time.monotonic() - started) * 1000, 1),
        result="ok",
    )
    return 0


def main() -> int:
    return dispatch(os.environ, sys.stdin.buffer.read(), sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
