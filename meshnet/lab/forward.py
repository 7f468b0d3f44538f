"""Makes a Kubernetes API server on this machine's loopback reachable from the lab's node namespaces.

A meshnetd inside a node namespace sees that namespace's own `lo`, so `127.0.0.1:<port>` of a
kubeconfig (kind, the tests' API server) is not there. This process listens on `127.0.0.1:<port>`
inside each node namespace and relays every connection to the same address in its own namespace:
a socket keeps the namespace it was created in, so one thread per node enters the node's namespace
(`setns` changes only the calling thread: meshnet.netns_thread) and opens its listener there.

    python -m meshnet.lab.forward --port 6443 mnl-lab-node0 mnl-lab-node1 ...

It prints `ready` once every listener is open and runs until it is terminated.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
from collections.abc import Sequence

from meshnet.netns_thread import in_each_netns


def listen_in(names: Sequence[str], port: int) -> list[socket.socket | OSError]:
    """A listener on 127.0.0.1:`port` inside each named namespace (opened there by a throw-away
    thread, so this process's own threads never leave home), or the error that namespace gave."""
    return in_each_netns(names, lambda: socket.create_server(("127.0.0.1", port), backlog=64))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):  # the other direction may have closed it already
                s.shutdown(socket.SHUT_RDWR)


def _relay(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _serve(listener: socket.socket, port: int) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_relay, args=(client, port), daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshnet.lab.forward", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("netns", nargs="+")
    a = p.parse_args(argv)
    listeners: list[socket.socket] = []
    for name, opened in zip(a.netns, listen_in(a.netns, a.port), strict=True):
        if isinstance(opened, OSError):
            print(f"cannot listen on 127.0.0.1:{a.port} in {name}: {opened}", file=sys.stderr, flush=True)
            return 1
        listeners.append(opened)
    for listener in listeners:
        threading.Thread(target=_serve, args=(listener, a.port), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
