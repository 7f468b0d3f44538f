"""The installer's PKI (meshnet.pki): what it makes, what it refuses, what leaves the directory."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from meshnet import pki

ROOT = Path(__file__).resolve().parent.parent


def test_secret_carries_node_material_but_never_the_ca_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pki.main(["--dir", str(tmp_path), "--secret", "--node", "w1=198.51.100.2 w2=198.51.100.3,2001:db8::3 "]) == 0
    secret = json.loads(capsys.readouterr().out)
    assert secret["metadata"] == {"name": "meshnet-tls", "namespace": "meshnet",
                                  "labels": {"app.kubernetes.io/name": "meshnet"}}
    assert sorted(secret["data"]) == ["ca.crt", "w1.crt", "w1.key", "w2.crt", "w2.key"]
    assert base64.b64decode(secret["data"]["w1.key"]) == (tmp_path / "w1.key").read_bytes()
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "w2.crt")],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:w2, IP Address:198.51.100.3, IP Address:2001:DB8:0:0:0:0:0:3" in text
    assert "Subject: CN = w2" in text and "TLS Web Client Authentication" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "w2.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


@pytest.mark.parametrize(("nodes", "message"), [
    ({"../../etc/passwd": []}, "node name: '../../etc/passwd' is not a valid DNS-1123 subdomain"),
    ({"w1": ["198.51.100.2 -extfile /etc/shadow"]}, "node w1: address '198.51.100.2 -extfile /etc/shadow' is not"),
    ({"W1": []}, "node name: 'W1'"),
])
def test_bad_values_never_reach_openssl(tmp_path: Path, nodes: dict[str, list[str]], message: str) -> None:
    with pytest.raises(pki.PkiError) as err:
        pki.ensure(tmp_path, nodes)
    assert message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]


def test_half_a_ca_is_not_replaced(tmp_path: Path) -> None:
    pki.ensure_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(pki.PkiError, match=r"only one of ca\.crt and ca\.key exists"):
        pki.ensure(tmp_path, {"w1": []})


def test_make_install_makes_the_secret_before_the_daemonset() -> None:
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "install"], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "kubectl apply" in line]
    assert "-m meshnet.pki --dir .pki --secret" in lines[1] and lines[1].endswith("| kubectl apply -f -")
    assert "pipefail" in lines[1] and lines[2].startswith("kubectl apply -k manifests/")
