"""JSON for the CNI shim without the `json` package's imports.

`json` imports `re` (and through it `enum`, `functools`, `collections`): ~15 ms of the shim's
~35 ms start-up, paid on every pod start. The C accelerator `_json` that `json` itself uses does
the real work without any of that, so the shim calls it directly. Semantics are `json`'s own
(strict decoding, `allow_nan`, ASCII-escaped output); without `_json` (not CPython) this falls
back to the `json` package.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover - every CPython has it
    _json = None  # type: ignore[assignment]

_WHITESPACE = " \t\n\r"


class JSONDecodeError(ValueError):
    """Raised for text that is not one JSON document (a ValueError, like json's own)."""


class _Context:
    # The attributes `_json.make_scanner` reads from a json.JSONDecoder.
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


def _fallback_loads(text: str) -> Any:
    import json

    return json.loads(text)


def loads(text: str | bytes) -> Any:
    if isinstance(text, bytes):
        text = text.decode()
    if _json is None:
        return _fallback_loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _json.make_scanner(_Context())(text, start)  # type: ignore[arg-type]  # duck-typed decoder
    except StopIteration as e:
        raise JSONDecodeError(f"expecting a JSON value at char {e.value}") from None
    except ValueError as e:  # the C scanner raises json.decoder.JSONDecodeError only if json is loaded
        raise JSONDecodeError(str(e)) from None
    if text[end:].strip(_WHITESPACE):
        raise JSONDecodeError(f"extra data at char {end}")
    return value


def _default(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: Any) -> str:
    if _json is None:
        import json

        return json.dumps(obj)
    encode = _json.make_encoder(None, _default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return "".join(encode(obj, 0))
