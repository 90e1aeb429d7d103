"""Tensor codecs for the KServe v2 protocol: tables from wire datatypes to numpy, both ways.

A tensor travels either as JSON (``data``: flat row-major or nested lists) or as raw
little-endian bytes (Triton's binary tensor extension). Everything here is pure numpy and
knows nothing about the model: the service checks datatypes and shapes against the signature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import BadRequest

# Wire datatype <-> numpy dtype. BYTES (length-prefixed strings) and BF16 have no numpy
# counterpart the model could use, so they are rejected as unsupported.
DATATYPE_TO_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DTYPE_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPE_TO_DTYPE.items()}

# Which numpy kinds a JSON ``data`` list may hold for a datatype's kind: numbers for floats,
# integers for integers, booleans for BOOL. A string such as "1.0" is an error, not a number.
_JSON_KINDS: dict[str, str] = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}

# The most bytes one value can take in a JSON ``data`` list, comma included: Python's shortest
# round-trip text of a float ("-1.2345678901234567e-308", 24 characters), of an int64
# ("-9223372036854775808") or uint64, of "false". Binary values take their itemsize.
JSON_BYTES_PER_VALUE: dict[str, int] = {"f": 25, "i": 21, "u": 21, "b": 6}

# Triton's dims are int64; numpy cannot make an array of more dimensions than this.
MAX_DIM = 2**63 - 1
MAX_RANK = 32


def dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype of wire ``datatype`` ("FP32" -> float32); BadRequest if unknown."""
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except (KeyError, TypeError):
        known = ", ".join(DATATYPE_TO_DTYPE)
        raise BadRequest(f"unsupported datatype {datatype!r} (supported: {known})") from None


def datatype_of(dtype: np.dtype | type | str) -> str:
    """The wire datatype of a numpy dtype (float32 -> "FP32")."""
    return DTYPE_TO_DATATYPE[np.dtype(dtype)]


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints; BadRequest naming the tensor otherwise."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape
    ):
        raise BadRequest(
            f"input '{name}': shape must be a list of non-negative integers (int64), "
            f"got {_clip(repr(shape))}"
        )
    if len(shape) > MAX_RANK:
        raise BadRequest(f"input '{name}': {len(shape)} dimensions, more than {MAX_RANK}")
    return tuple(shape)


def encoded_size(dtype: np.dtype, count: int, binary: bool) -> int:
    """The most bytes ``count`` values of ``dtype`` take in a response, binary or JSON."""
    return count * (dtype.itemsize if binary else JSON_BYTES_PER_VALUE[dtype.kind])


def _clip(text: str, limit: int = 200) -> str:
    # An error message echoes what the client sent, but not all of a hostile megabyte of it.
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _reshape(name: str, values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    try:
        return values.reshape(shape)
    except ValueError as e:  # a shape numpy cannot make, e.g. [0, 2**62, 2**62]
        raise BadRequest(f"input '{name}': no array has shape {list(shape)}: {e}") from None


def decode_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """A tensor from JSON ``data`` (flat row-major or nested to ``shape``)."""
    dtype = dtype_of(datatype)
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nested lists
        raise BadRequest(f"input '{name}': data is not a regular (nested) list") from None
    if values.size and values.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise BadRequest(f"input '{name}': data holds {values.dtype.kind!r} values, not {datatype}")
    count = math.prod(shape)
    if values.size != count:
        raise BadRequest(
            f"input '{name}': {values.size} values in data, but shape {list(shape)} needs {count}"
        )
    if dtype.kind in "iu" and values.size and values.dtype != dtype:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise BadRequest(f"input '{name}': data holds values outside the range of {datatype}")
    # A float above FP32's range becomes inf, which validation refuses with a clear message.
    with np.errstate(over="ignore"):
        return _reshape(name, values.astype(dtype, copy=False), shape)


def decode_bytes(
    name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview
) -> np.ndarray:
    """A tensor from its raw little-endian bytes (the binary tensor extension)."""
    dtype = dtype_of(datatype).newbyteorder("<")
    expected = dtype.itemsize * math.prod(shape)
    if len(raw) != expected:
        raise BadRequest(
            f"input '{name}': binary_data_size is {len(raw)} bytes, but {datatype} "
            f"{list(shape)} needs {expected}"
        )
    return _reshape(name, np.frombuffer(raw, dtype=dtype), shape)


def encode_json(array: np.ndarray) -> list[Any]:
    """A tensor's values as a flat row-major list, as Triton returns them."""
    return array.ravel().tolist()


def encode_bytes(array: np.ndarray) -> bytes:
    """A tensor's values as raw little-endian bytes, row-major."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
