"""Strict reading of untrusted JSON: size, depth and string rules before any field is used.

Store headers, safetensors ``__metadata__``, model metadata and episode files may come
from anyone. Python's ``json`` module recurses once per nesting level (``[`` x 100,000
is a RecursionError), accepts ``NaN``, duplicate keys (the last one wins) and ``\\ud800``
escapes that decode to lone surrogates (which no file or terminal can encode), and
``bool`` is an ``int`` subclass. :func:`loads` refuses all of these before parsing, and the
``need_*`` functions check one field's type and range, so that a parser reads a document
only through them and every failure is the caller's own one-line error.

Example:
    >>> doc = loads('{"dim": 64}')
    >>> need_int(doc, "dim", lo=1, hi=1 << 16)
    64
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any, Callable

from edgemeta.runtime.errors import SchemaError

__all__ = [
    "MAX_DEPTH",
    "SchemaError",
    "loads",
    "check_text",
    "need",
    "need_int",
    "need_float",
    "need_str",
    "need_bool",
    "need_list",
    "need_dict",
]

MAX_DEPTH = 32  # no edgemeta document nests deeper than ~6 levels
_DEFAULT_LIMIT = 1 << 26


def _depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (outside strings), in one linear pass."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise SchemaError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise SchemaError(f"key {dup!r} appears twice")
    return d


def check_text(s: str, what: str, *, max_len: int = 4096, nfc: bool = False, allow_empty: bool = True) -> str:
    """``s`` if it is valid text: no lone surrogates, no control characters, at most
    ``max_len`` characters, and (with ``nfc``) in Unicode's composed form."""
    if len(s) > max_len:
        raise SchemaError(f"{what} is {len(s):,} characters long, over the limit of {max_len:,}")
    if not s and not allow_empty:
        raise SchemaError(f"{what} is empty")
    if s.isascii() and s.isprintable():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise SchemaError(f"{what} holds a lone surrogate (not valid Unicode)") from None
    if any(unicodedata.category(ch) == "Cc" for ch in s):
        raise SchemaError(f"{what} holds control characters (newline, escape, ...)")
    if nfc and not unicodedata.is_normalized("NFC", s):
        raise SchemaError(f"{what} is not in Unicode's composed form (NFC)")
    return s


def _check_strings(doc: Any, max_len: int) -> None:
    """Every key and string value in ``doc`` is encodable text (iterative: depth is bounded already)."""
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if not x.isascii():
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise SchemaError("a string holds a lone surrogate (not valid Unicode)") from None
            if len(x) > max_len:
                raise SchemaError(f"a string is {len(x):,} characters long, over the limit of {max_len:,}")
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def loads(
    data: str | bytes, *, limit: int = _DEFAULT_LIMIT, max_depth: int = MAX_DEPTH, max_string: int = 1 << 20
) -> Any:
    """Parse untrusted JSON: at most ``limit`` bytes, ``max_depth`` levels, strings of at most
    ``max_string`` characters; no NaN/Infinity, no duplicate keys, no lone surrogates.

    Raises:
        SchemaError: any of these, or text that is not JSON (the message says which).
    """
    if len(data) > limit:
        raise SchemaError(f"JSON document of {len(data):,} bytes, over the limit of {limit:,}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SchemaError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    elif isinstance(data, str):
        text = data
    else:
        raise SchemaError(f"expected JSON text, got {type(data).__name__}")
    depth = _depth(text)
    if depth > max_depth:
        raise SchemaError(f"JSON nested {depth} levels deep, over the limit of {max_depth}")
    try:
        doc = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except SchemaError:
        raise
    except (ValueError, RecursionError) as e:
        raise SchemaError(f"not valid JSON ({' '.join(str(e).split())[:200]})") from None
    _check_strings(doc, max_string)
    return doc


# ---- fields --------------------------------------------------------------------------

_MISSING = object()


def need(doc: dict, key: str, check: Callable[[Any, str], Any], default: Any = _MISSING) -> Any:
    """``check(doc[key], key)``; ``default`` when the key is absent and a default is given."""
    if key not in doc:
        if default is _MISSING:
            raise SchemaError(f"field {key!r} is missing")
        return default
    return check(doc[key], key)


def need_int(doc: dict, key: str, *, lo: int | None = None, hi: int | None = None, default: Any = _MISSING) -> int:
    """An integer field (``true`` and ``64.0`` are not integers) within ``[lo, hi]``."""

    def check(v: Any, what: str) -> int:
        return as_int(v, what, lo=lo, hi=hi)

    return need(doc, key, check, default)


def as_int(v: Any, what: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if type(v) is not int:
        raise SchemaError(f"{what} must be an integer, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SchemaError(
            f"{what} must be in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}], got {v}"
        )
    return v


def as_float(v: Any, what: str, *, lo: float | None = None, hi: float | None = None) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise SchemaError(f"{what} must be a finite number, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SchemaError(f"{what} must be in [{lo}, {hi}], got {v}")
    return float(v)


def need_float(
    doc: dict, key: str, *, lo: float | None = None, hi: float | None = None, default: Any = _MISSING
) -> float:
    return need(doc, key, lambda v, what: as_float(v, what, lo=lo, hi=hi), default)


def need_str(
    doc: dict, key: str, *, max_len: int = 4096, choices: tuple[str, ...] | None = None, default: Any = _MISSING
) -> str:
    """A text field (see :func:`check_text`), one of ``choices`` when given."""

    def check(v: Any, what: str) -> str:
        if type(v) is not str:
            raise SchemaError(f"{what} must be a string, got {_show(v)}")
        check_text(v, what, max_len=max_len)
        if choices is not None and v not in choices:
            raise SchemaError(f"{what} must be one of {', '.join(choices)}, got {v[:40]!r}")
        return v

    return need(doc, key, check, default)


def need_bool(doc: dict, key: str, *, default: Any = _MISSING) -> bool:
    def check(v: Any, what: str) -> bool:
        if type(v) is not bool:
            raise SchemaError(f"{what} must be true or false, got {_show(v)}")
        return v

    return need(doc, key, check, default)


def need_list(doc: dict, key: str, *, max_len: int, default: Any = _MISSING) -> list:
    def check(v: Any, what: str) -> list:
        if type(v) is not list:
            raise SchemaError(f"{what} must be a list, got {_show(v)}")
        if len(v) > max_len:
            raise SchemaError(f"{what} has {len(v):,} items, over the limit of {max_len:,}")
        return v

    return need(doc, key, check, default)


def need_dict(doc: dict, key: str, *, default: Any = _MISSING) -> dict:
    def check(v: Any, what: str) -> dict:
        if type(v) is not dict:
            raise SchemaError(f"{what} must be an object, got {_show(v)}")
        return v

    return need(doc, key, check, default)


def _show(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (bool, int, float, str, type(None))) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."
