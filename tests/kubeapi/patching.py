"""PATCH bodies as the API server applies them: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

Strategic merge patch is served as a merge patch: the objects our code patches (Topology CRs,
pod status) have no list-merge keys that would make the two differ.
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """A patch that cannot be applied to the document (the API server answers 422)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, `null` deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(document: Any, operations: Any) -> Any:
    """RFC 6902: apply `operations` in order to a copy of `document`; all or nothing."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(document)
    for number, operation in enumerate(operations):
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise PatchError(f"operation {number} needs 'op' and 'path': {operation!r}")
        op = operation["op"]
        path = _pointer(operation["path"])
        if op == "add":
            doc = _add(doc, path, copy.deepcopy(_value(operation)))
        elif op == "remove":
            doc = _remove(doc, path)
        elif op == "replace":
            _get(doc, path)  # replace needs an existing target, unlike add
            doc = _add(_remove(doc, path), path, copy.deepcopy(_value(operation)))
        elif op in ("move", "copy"):
            source = _pointer(operation.get("from", ""))
            value = copy.deepcopy(_get(doc, source))
            if op == "move":
                doc = _remove(doc, source)
            doc = _add(doc, path, value)
        elif op == "test":
            if _get(doc, path) != _value(operation):
                raise PatchError(f"test operation failed at {operation['path']!r}")
        else:
            raise PatchError(f"unknown JSON patch operation {op!r}")
    return doc


def _value(operation: dict[str, Any]) -> Any:
    if "value" not in operation:
        raise PatchError(f"operation {operation['op']!r} at {operation['path']!r} needs a 'value'")
    return operation["value"]


def _pointer(text: Any) -> list[str]:
    if not isinstance(text, str) or (text and not text.startswith("/")):
        raise PatchError(f"invalid JSON pointer {text!r}")
    if not text:
        return []
    return [token.replace("~1", "/").replace("~0", "~") for token in text[1:].split("/")]


def _index(container: list[Any], token: str, *, for_insert: bool) -> int:
    if for_insert and token == "-":
        return len(container)
    if not token.isdigit():
        raise PatchError(f"invalid array index {token!r}")
    index = int(token)
    if index > len(container) or (index == len(container) and not for_insert):
        raise PatchError(f"array index {index} out of range")
    return index


def _get(doc: Any, path: list[str]) -> Any:
    for token in path:
        if isinstance(doc, dict):
            if token not in doc:
                raise PatchError(f"path member {token!r} does not exist")
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(doc, token, for_insert=False)]
        else:
            raise PatchError(f"cannot descend into a scalar at {token!r}")
    return doc


def _add(doc: Any, path: list[str], value: Any) -> Any:
    if not path:
        return value
    parent = _get(doc, path[:-1])
    token = path[-1]
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, token, for_insert=True), value)
    else:
        raise PatchError(f"cannot add {token!r} to a scalar")
    return doc


def _remove(doc: Any, path: list[str]) -> Any:
    if not path:
        raise PatchError("cannot remove the whole document")
    parent = _get(doc, path[:-1])
    token = path[-1]
    if isinstance(parent, dict):
        if token not in parent:
            raise PatchError(f"path member {token!r} does not exist")
        del parent[token]
    elif isinstance(parent, list):
        del parent[_index(parent, token, for_insert=False)]
    else:
        raise PatchError(f"cannot remove {token!r} from a scalar")
    return doc
