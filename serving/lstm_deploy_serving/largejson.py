"""Large JSON bodies in small steps: what keeps the event loop responsive while one is handled.

``json.loads`` and ``json.dumps`` hold the GIL for their whole call (about 25 ms per MB of float
data), so running them whole in a worker thread still stops the event loop for seconds, and a
60 MB list of floats becomes 500 MB of Python objects before anything can see that the tensor it
claims to be is ``[1, 1, 16]``. Here the work is cut into C calls of a few milliseconds, between
which the worker thread gives the GIL back:

- ``loads_header`` walks the request's JSON skeleton itself (small: names, shapes, parameters)
  and only locates each input's ``data`` array (byte searches in bounded blocks); it checks the
  count of values and the size of the text against the declared ``shape`` before parsing any
  number (too many: 400 at once), then parses the numbers a chunk at a time into numpy. The
  result is what ``json.loads`` gives, except that each input's ``data`` is already an array.
- ``encode_json_data`` writes an output's values as JSON text a chunk at a time.

Semantics are ``json.loads``'s and ``codecs.decode_json``'s: same values, same 400s (a ragged
nested list is still "not a regular (nested) list"); only malformed data arrays are reported
with a shorter message.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import BadRequest

CHUNK_BYTES = 256 * 1024  # one json.loads of float text: ~6 ms of GIL
BLOCK_BYTES = 4 * 1024 * 1024  # one bytes.count/find: ~2 ms of GIL
CHUNK_VALUES = 16 * 1024  # one json.dumps of floats: ~8 ms of GIL
# The most text one value may take in a data array (digits, sign, exponent, the separator and
# any indentation a pretty-printer adds); past it the text is padding, not data.
MAX_CHARS_PER_VALUE = 64
_SLACK_CHARS = 4096

_WS = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\.)*"')
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")
_OPEN, _CLOSE, _COMMA = ord("["), ord("]"), ord(",")


class _Data:
    """An input's ``data`` array, located in the body but not parsed yet."""

    def __init__(self, start: int, end: int, commas: int, opens: int) -> None:
        self.start, self.end, self.commas, self.opens = start, end, commas, opens


def _blocks(start: int, end: int) -> Iterator[tuple[int, int]]:
    for lo in range(start, end, BLOCK_BYTES):
        yield lo, min(lo + BLOCK_BYTES, end)


def _count(raw: bytes, sub: bytes, start: int, end: int) -> int:
    return sum(raw.count(sub, lo, hi) for lo, hi in _blocks(start, end))


def _find(raw: bytes, sub: bytes, start: int, end: int) -> int:
    for lo, hi in _blocks(start, end):
        at = raw.find(sub, lo, hi)
        if at >= 0:
            return at
    return -1


class _Walker:
    """A JSON parser for the request header that skips over the inputs' data arrays."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def fail(self, what: str, pos: int) -> ValueError:
        return ValueError(f"{what}: byte {pos}")

    def ws(self, pos: int) -> int:
        match = _WS.match(self.raw, pos)
        assert match is not None  # the pattern matches the empty string
        return match.end()

    def document(self) -> Any:
        pos = self.ws(0)
        value, pos = self.value(pos, self.top_member)
        if self.ws(pos) != len(self.raw):
            raise self.fail("Extra data", pos)
        return value

    def value(self, pos: int, member: Any = None) -> tuple[Any, int]:
        head = self.raw[pos : pos + 1]
        if head == b"{":
            return self.object(pos, member or self.plain_member)
        if head == b"[":
            return self.array(pos, lambda p: self.value(p))
        match = (_STRING if head == b'"' else _SCALAR).match(self.raw, pos)
        if match is None:
            raise self.fail("Expecting value", pos)
        return json.loads(match.group()), match.end()

    def object(self, pos: int, member: Any) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        pos = self.ws(pos + 1)
        if self.raw[pos : pos + 1] == b"}":
            return result, pos + 1
        while True:
            match = _STRING.match(self.raw, pos)
            if match is None:
                raise self.fail("Expecting property name enclosed in double quotes", pos)
            key = json.loads(match.group())
            pos = self.ws(match.end())
            if self.raw[pos : pos + 1] != b":":
                raise self.fail("Expecting ':' delimiter", pos)
            result[key], pos = member(key, self.ws(pos + 1))
            pos = self.ws(pos)
            sep = self.raw[pos : pos + 1]
            if sep == b"}":
                return result, pos + 1
            if sep != b",":
                raise self.fail("Expecting ',' delimiter", pos)
            pos = self.ws(pos + 1)

    def array(self, pos: int, element: Any) -> tuple[list[Any], int]:
        result: list[Any] = []
        pos = self.ws(pos + 1)
        if self.raw[pos : pos + 1] == b"]":
            return result, pos + 1
        while True:
            item, pos = element(pos)
            result.append(item)
            pos = self.ws(pos)
            sep = self.raw[pos : pos + 1]
            if sep == b"]":
                return result, pos + 1
            if sep != b",":
                raise self.fail("Expecting ',' delimiter", pos)
            pos = self.ws(pos + 1)

    def plain_member(self, key: str, pos: int) -> tuple[Any, int]:
        return self.value(pos)

    def top_member(self, key: str, pos: int) -> tuple[Any, int]:
        if key == "inputs" and self.raw[pos : pos + 1] == b"[":
            return self.array(pos, lambda p: self.value(p, self.input_member))
        return self.value(pos)

    def input_member(self, key: str, pos: int) -> tuple[Any, int]:
        if key == "data" and self.raw[pos : pos + 1] == b"[":
            return self.skip_data(pos)
        return self.value(pos)

    def skip_data(self, pos: int) -> tuple[_Data, int]:
        """Locate a data array without parsing it: it holds numbers and booleans only, so it
        ends at the last ']' before the next '"', '{' or '}' (its input object's end)."""
        raw, end_object = self.raw, _find(self.raw, b"}", pos, len(self.raw))
        if end_object < 0:
            raise self.fail("Expecting '}'", len(raw))
        stops = [_find(raw, c, pos, end_object) for c in (b'"', b"{")]
        stop = min([s for s in stops if s >= 0], default=end_object)
        close = raw.rfind(b"]", pos, stop)
        after = self.ws(close + 1)
        if raw[after : after + 1] == b",":
            after = self.ws(after + 1)
        balanced = close >= 0 and _count(raw, b"[", pos, close) == _count(raw, b"]", pos, close + 1)
        if not balanced or after != stop:
            raise self.fail("data must be a (nested) list of numbers or booleans", pos)
        data = _Data(pos, close + 1, _count(raw, b",", pos, close), _count(raw, b"[", pos, close))
        return data, close + 1


def _top_commas(raw: bytes, start: int, end: int) -> np.ndarray:
    """Positions of the commas in ``raw[start:end]`` outside any bracket opened there."""
    inner = np.frombuffer(raw, np.uint8, end - start, start)
    found, depth = [], 0
    for lo in range(0, len(inner), BLOCK_BYTES):
        block = inner[lo : lo + BLOCK_BYTES]
        level = np.cumsum((block == _OPEN).astype(np.int32) - (block == _CLOSE)) + depth
        depth = int(level[-1])
        found.append(np.flatnonzero((block == _COMMA) & (level == 0)) + (start + lo))
    return np.concatenate(found)


def _array(raw: bytes, start: int, end: int) -> np.ndarray:
    """``np.asarray(json.loads(raw[start:end]))`` for an array, parsed a chunk at a time."""
    if end - start <= CHUNK_BYTES:
        return np.asarray(json.loads(raw[start:end]))
    lo, hi = start + 1, end - 1  # inside the brackets
    first = _WS.match(raw, lo)
    assert first is not None
    parts: list[np.ndarray] = []
    if raw[first.end() : first.end() + 1] != b"[":  # flat: any comma separates two values
        while lo < hi:
            cut = raw.find(b",", min(lo + CHUNK_BYTES, hi), hi)
            cut = hi if cut < 0 else cut
            parts.append(np.asarray(json.loads(b"[" + raw[lo:cut] + b"]")))
            lo = cut + 1
    else:  # nested: whole elements per chunk; an element larger than a chunk on its own
        commas = _top_commas(raw, lo, hi)
        starts = np.concatenate([[lo], commas + 1])
        ends = np.concatenate([commas, [hi]])
        i = 0
        while i < len(starts):
            j = int(np.searchsorted(ends, starts[i] + CHUNK_BYTES, side="right"))
            if j <= i:
                sub_lo = raw.find(b"[", int(starts[i]), int(ends[i]))
                sub_hi = raw.rfind(b"]", int(starts[i]), int(ends[i])) + 1
                if sub_lo < 0 or raw[int(starts[i]) : sub_lo].strip():
                    raise ValueError("malformed data array")
                parts.append(_array(raw, sub_lo, sub_hi)[None])
                j = i + 1
            else:
                piece = raw[int(starts[i]) : int(ends[j - 1])]
                parts.append(np.asarray(json.loads(b"[" + piece + b"]")))
            i = j
    if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        raise ValueError("ragged")
    return np.concatenate(parts)


def _parse_data(raw: bytes, item: dict[str, Any]) -> None:
    data, name, shape = item["data"], item.get("name"), item.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        item["data"] = None  # the protocol reports the shape
        return
    count = math.prod(shape)
    # A valid array of V values, E of its (nested) arrays empty, has V - 1 + E commas.
    at_least = data.commas + 1 - data.opens
    if at_least > count:
        raise BadRequest(
            f"input '{name}': at least {at_least} values in data, but shape {shape} needs {count}"
        )
    size = data.end - data.start
    if size > count * MAX_CHARS_PER_VALUE + _SLACK_CHARS:
        raise BadRequest(
            f"input '{name}': {size} bytes of JSON data for the {count} values of shape {shape} "
            f"(at most {MAX_CHARS_PER_VALUE} a value); send large tensors as binary data"
        )
    try:
        item["data"] = _array(raw, data.start, data.end)
    except (ValueError, RecursionError):
        raise BadRequest(
            f"input '{name}': data is not a regular (nested) list of numbers or booleans"
        ) from None


def loads_header(raw: bytes) -> Any:
    """``json.loads(raw)`` for a request header, each input's ``data`` list as a numpy array.

    Raises ValueError for malformed JSON and ``BadRequest`` for data
    that cannot match its declared shape, before parsing it.
    """
    if not all(raw[lo:hi].isascii() for lo, hi in _blocks(0, len(raw))):
        # Non-ASCII text can only be in strings (names, ids), unusual: the standard parser.
        return json.loads(raw)
    try:
        header = _Walker(raw).document()
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    inputs = header.get("inputs") if isinstance(header, dict) else None
    for item in inputs if isinstance(inputs, list) else ():
        if isinstance(item, dict) and isinstance(item.get("data"), _Data):
            _parse_data(raw, item)
    return header


def encode_json_data(array: np.ndarray) -> bytes:
    """``json.dumps(array.ravel().tolist())`` in chunks (compact separators)."""
    flat = array.ravel()
    pieces = [
        json.dumps(flat[i : i + CHUNK_VALUES].tolist(), separators=(",", ":"))[1:-1].encode()
        for i in range(0, flat.size, CHUNK_VALUES)
    ]
    return b"[" + b",".join(pieces) + b"]"
