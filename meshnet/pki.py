"""meshnet's small PKI: a CA and one certificate per node for the daemons' mutual TLS (peer gRPC).

`make install` (and `python -m meshnet.pki`) creates what is missing in a directory kept by the
operator: the CA key never leaves it, only `ca.crt` and the node certificates and keys go into the
Secret the DaemonSet mounts (`secret_manifest`). A node certificate's identity is the node name:
CN and a DNS subjectAltName; the node's VTEP addresses are added as IP subjectAltNames, so a
daemon that dials a peer by its VTEP address can check it reached that node.

The `openssl` command line (Debian's) does the cryptography: the `cryptography` package is not in
the venv's dependency tree, and a new compiled dependency for a few certificates a year is not worth
it. Every value that reaches openssl is validated first (node names as Kubernetes names, addresses
through `ipaddress`) and commands are argv lists, never shell strings.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshnet import naming

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 3650
NODE_DAYS = 825
SECRET_NAME = "meshnet-tls"
SECRET_NAMESPACE = "meshnet"
OPENSSL = "openssl"
# EC P-256: small keys, fast handshakes, and what every TLS stack accepts.
_NEWKEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


class PkiError(Exception):
    """A certificate could not be made; the message names the node or file."""


def node_cert(directory: Path | str, node: str) -> Path:
    return Path(directory) / f"{node}.crt"


def node_key(directory: Path | str, node: str) -> Path:
    return Path(directory) / f"{node}.key"


def _openssl(*args: str) -> None:
    try:
        subprocess.run([OPENSSL, *args], check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as e:
        raise PkiError("openssl is not installed (Debian: apt-get install openssl)") from e
    except subprocess.CalledProcessError as e:
        raise PkiError(f"openssl {args[0]} failed: {e.stderr.strip()}") from e


def _check_node(node: str, addresses: Sequence[str]) -> list[str]:
    why = naming.k8s_name_problem(node)
    if why:
        raise PkiError(f"node name: {why}")
    out = []
    for a in addresses:
        try:
            out.append(str(ipaddress.ip_address(a)))
        except ValueError as e:
            raise PkiError(f"node {node}: address {a!r} is not an IP address") from e
    return out


def ensure_ca(directory: Path | str) -> bool:
    """Create the CA in `directory` unless it is there; True if it was made now."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = d / CA_CERT, d / CA_KEY
    if cert.exists() and key.exists():
        return False
    if cert.exists() or key.exists():
        raise PkiError(f"{d}: only one of {CA_CERT} and {CA_KEY} exists; restore the other or remove both")
    old = os.umask(0o077)  # the key is never readable by anyone else, not even for a moment
    try:
        _openssl("req", "-x509", *_NEWKEY, "-keyout", str(key), "-out", str(cert), "-days", str(CA_DAYS),
                 "-subj", "/CN=meshnet-ca", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    finally:
        os.umask(old)
    return True


def ensure_node(directory: Path | str, node: str, addresses: Sequence[str] = ()) -> bool:
    """Create `node`'s certificate and key, signed by the CA, unless they exist; True if made now."""
    d = Path(directory)
    ips = _check_node(node, addresses)
    cert, key = node_cert(d, node), node_key(d, node)
    if cert.exists() and key.exists():
        return False
    if not (d / CA_KEY).exists():
        raise PkiError(f"{d}: no CA ({CA_KEY}); run ensure_ca first")
    san = ",".join([f"DNS:{node}", *(f"IP:{ip}" for ip in ips)])
    old = os.umask(0o077)
    try:
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            csr = Path(tmp) / "node.csr"
            _openssl("req", "-new", *_NEWKEY, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={node}",
                     "-addext", f"subjectAltName={san}",
                     "-addext", "keyUsage=critical,digitalSignature",
                     # One certificate per node, both ends of its gRPC calls: it serves and it dials.
                     "-addext", "extendedKeyUsage=serverAuth,clientAuth")
            _openssl("x509", "-req", "-in", str(csr), "-CA", str(d / CA_CERT), "-CAkey", str(d / CA_KEY),
                     "-CAcreateserial", "-CAserial", str(d / "ca.srl"), "-out", str(cert),
                     "-days", str(NODE_DAYS), "-copy_extensions", "copyall")
    finally:
        os.umask(old)
    return True


def ensure(directory: Path | str, nodes: Mapping[str, Sequence[str]]) -> list[str]:
    """The CA and a certificate for each node, made where missing; returns what was made."""
    made = [CA_CERT] if ensure_ca(directory) else []
    for node, addresses in sorted(nodes.items()):
        if ensure_node(directory, node, addresses):
            made.append(node_cert(directory, node).name)
    return made


def secret_manifest(directory: Path | str, nodes: Sequence[str], *, name: str = SECRET_NAME,
                    namespace: str = SECRET_NAMESPACE) -> dict[str, object]:
    """The Secret the DaemonSet mounts: the CA certificate and each node's certificate and key —
    never the CA key, which stays with the operator."""
    d = Path(directory)
    files = [d / CA_CERT, *(p for n in sorted(nodes) for p in (node_cert(d, n), node_key(d, n)))]
    data = {p.name: base64.b64encode(p.read_bytes()).decode() for p in files}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "meshnet"}},
            "data": data}


def _parse_nodes(values: Sequence[str]) -> dict[str, list[str]]:
    """`name` or `name=ip[,ip...]`, as `kubectl get nodes` prints them (see the Makefile)."""
    nodes: dict[str, list[str]] = {}
    for value in values:
        for item in value.split():
            name, _, ips = item.partition("=")
            nodes.setdefault(name, []).extend(ip for ip in ips.split(",") if ip)
    return nodes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshnet.pki",
                                description="create meshnet's CA and node certificates where missing")
    p.add_argument("--dir", required=True, help="where the CA and the certificates are kept (protect it)")
    p.add_argument("--node", action="append", default=[],
                   help="NAME or NAME=IP[,IP]; repeatable, or several separated by spaces")
    p.add_argument("--secret", action="store_true", help="print the Secret for the DaemonSet as JSON on stdout")
    a = p.parse_args(argv)
    try:
        nodes = _parse_nodes(a.node)
        made = ensure(a.dir, nodes)
        if a.secret:
            json.dump(secret_manifest(a.dir, list(nodes)), sys.stdout)
            sys.stdout.write("\n")
    except (PkiError, OSError) as e:
        print(f"meshnet.pki: {e}", file=sys.stderr)
        return 1
    print(f"meshnet.pki: {a.dir}: made {', '.join(made) or 'nothing (all present)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
