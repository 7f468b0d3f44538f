"""The shim's JSON (the C accelerator called directly) must behave like the `json` package."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from meshnet.cni import wirejson

DOCS = [
    '{"cniVersion": "1.0.0", "name": "n", "type": "meshnet", "delegate": {"plugins": [{"type": "bridge"}]}}',
    ' \n[1, -2, 3.5e-3, true, false, null, "é \\u00e9 \\n \\"q\\""]\t',
    '"just a string"', "0", "{}", "[]", '{"nested": {"a": [{"b": [[]]}]}}',
]


@pytest.mark.parametrize("text", DOCS)
def test_loads_agrees_with_json(text: str) -> None:
    assert wirejson.loads(text) == json.loads(text)
    assert wirejson.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text", ["", "   ", "{", '{"a":}', "[1,]", "{} x", '{"a": 1}}', "nul", "'single'"])
def test_loads_refuses_what_json_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        wirejson.loads(text)


@pytest.mark.parametrize("obj", [
    {"cniVersion": "1.0.0", "interfaces": [{"name": "eth1", "mac": "02:00:00:00:00:01"}], "dns": {}},
    ["é", "\n", '"', 1, 2.5, True, None, {"k": []}], "plain", 0,
])
def test_dumps_agrees_with_json(obj: Any) -> None:
    assert wirejson.dumps(obj) == json.dumps(obj)


def test_dumps_refuses_what_json_cannot_encode() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        wirejson.dumps({"x": object()})


def test_the_shim_imports_neither_json_nor_re() -> None:
    """The point of the module: a pod start does not pay for json, re, enum or dataclasses."""
    code = ("import sys; sys.path.insert(0, '.'); import meshnet.cni.shim; "
            "print(sorted(m for m in ('json', 're', 'enum', 'dataclasses', 'socket', 'typing') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-S", "-E", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
