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
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(
            f"input '{name}': shape must be a list of non-negative integers, got {shape!r}"
        )
    return tuple(shape)


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
    return values.astype(dtype, copy=False).reshape(shape)


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
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def encode_json(array: np.ndarray) -> list[Any]:
    """A tensor's values as a flat row-major list, as Triton returns them."""
    return array.ravel().tolist()


def encode_bytes(array: np.ndarray) -> bytes:
    """A tensor's values as raw little-endian bytes, row-major."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
