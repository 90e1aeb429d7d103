"""KServe v2 / Open Inference Protocol wire types, as Triton speaks them over HTTP.

An inference body is a JSON header, optionally followed by raw tensor bytes (Triton's binary
tensor extension): the ``Inference-Header-Content-Length`` HTTP header gives the JSON's length,
and each binary input says how many of the following bytes are its own with the
``binary_data_size`` parameter, in the order of ``inputs``. Responses mirror that: an output asked
for with ``binary_data`` (or every output, under the request parameter ``binary_data_output``)
travels as bytes after the JSON.

This module turns bodies into typed requests and typed responses into bodies; it knows nothing
about the model (the service checks names, datatypes and shapes against the signature). It reads
the JSON header first without the tensors' ``data`` lists, so that the service can refuse a
request from its header (``RequestHeader``) before any tensor is decoded.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from . import codecs
from .errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class TensorHeader:
    """An input as the request's header describes it, before its data is decoded."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class InputTensor(TensorHeader):
    data: np.ndarray


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class RequestHeader:
    """An inference request's header: what it sends and asks for, without the tensor values."""

    inputs: tuple[TensorHeader, ...]
    # None: every output of the model, in binary iff ``binary_output``.
    outputs: tuple[RequestedOutput, ...] | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_output(self) -> bool:
        return bool(self.parameters.get("binary_data_output", False))


@dataclass(frozen=True)
class InferRequest(RequestHeader):
    """The whole request: its header, with the inputs' values decoded."""

    inputs: tuple[InputTensor, ...]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    data: np.ndarray
    binary: bool


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: tuple[OutputTensor, ...]
    id: str | None = None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _bool_parameter(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(
            f"{where}: parameter '{key}' must be a boolean, got {type(value).__name__}"
        )
    return value


def _binary_size(name: str, params: dict[str, Any]) -> int | None:
    size = params.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
    return size


def _input_header(item: Any) -> TensorHeader:
    item = _object(item, "each of 'inputs'")
    name, datatype = item.get("name"), item.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise BadRequest("each input needs a string 'name' and 'datatype'")
    shape = codecs.check_shape(name, item.get("shape"))
    params = _object(item.get("parameters", {}), f"input '{name}': parameters")
    if "shared_memory_region" in params:
        raise BadRequest(f"input '{name}': shared memory is not supported by this server")
    if _binary_size(name, params) is not None:
        if "data" in item:
            raise BadRequest(f"input '{name}': give either 'data' or binary_data_size, not both")
    elif "data" not in item:
        raise BadRequest(f"input '{name}': no 'data' and no binary_data_size")
    return TensorHeader(name, datatype, shape)


def _input_tensor(
    item: dict[str, Any], head: TensorHeader, binary: memoryview, offset: int
) -> tuple[InputTensor, int]:
    name, datatype, shape = head.name, head.datatype, head.shape
    size = _binary_size(name, item.get("parameters", {}))
    if size is None:
        data = codecs.decode_json(name, datatype, shape, item["data"])
        return InputTensor(name, datatype, shape, data), offset
    if offset + size > len(binary):
        raise BadRequest(
            f"input '{name}': binary_data_size {size} goes past the end of the body "
            f"({len(binary) - offset} bytes left): truncated binary data"
        )
    data = codecs.decode_bytes(name, datatype, shape, binary[offset : offset + size])
    return InputTensor(name, datatype, shape, data), offset + size


def _parse_output(item: Any, default_binary: bool) -> RequestedOutput:
    item = _object(item, "each of 'outputs'")
    name = item.get("name")
    if not isinstance(name, str):
        raise BadRequest("each requested output needs a string 'name'")
    params = _object(item.get("parameters", {}), f"output '{name}': parameters")
    if "shared_memory_region" in params or "classification" in params:
        raise BadRequest(f"output '{name}': shared memory and classification are not supported")
    if "binary_data" not in params:
        return RequestedOutput(name, default_binary)
    return RequestedOutput(name, _bool_parameter(params, "binary_data", f"output '{name}'"))


def _read_header(header: Any) -> RequestHeader:
    """The request's header, every field checked; its ``data`` lists are not looked at."""
    header = _object(header, "the request")
    parameters = _object(header.get("parameters", {}), "'parameters'")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("the request needs a non-empty list 'inputs'")
    inputs = tuple(_input_header(item) for item in raw_inputs)
    names = [t.name for t in inputs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadRequest(f"duplicate inputs: {', '.join(duplicates)}")
    default = _bool_parameter(parameters, "binary_data_output", "the request")
    outputs = None
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list):
            raise BadRequest("'outputs' must be a list")
        outputs = tuple(_parse_output(item, default) for item in header["outputs"])
        wanted = [o.name for o in outputs]
        if len(set(wanted)) != len(wanted):
            raise BadRequest("an output is requested more than once")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    # An empty id is no id: Triton echoes only one that is not empty (perf_analyzer sends "").
    return RequestHeader(inputs, outputs, request_id or None, parameters)


# A "data" key whose value is a list, and what a list of numbers or booleans (nested or not) may
# hold, up to the next key or the end of its object: no quote, no brace.
_DATA_LIST = re.compile(rb'"data"\s*:\s*(?=\[)')
_NUMBERS = re.compile(rb"[\[\]0-9A-Za-z+\-.,\s]*")
# Bytes per regex or count call over a tensor's text: a millisecond or so, so that a worker thread
# scanning a 60 MB body gives the GIL back to the event loop between calls.
_BLOCK = 1 << 20


def _blocks(start: int, end: int) -> Iterator[tuple[int, int]]:
    for a in range(start, end, _BLOCK):
        yield a, min(a + _BLOCK, end)


def _numbers_end(text: bytes, start: int) -> int:
    for a, b in _blocks(start, len(text)):
        run = _NUMBERS.match(text, a, b)
        end = run.end() if run else a
        if end < b:
            return end
    return len(text)


def _balanced(text: bytes, start: int, end: int) -> bool:
    opened = sum(text.count(b"[", a, b) for a, b in _blocks(start, end))
    return opened == sum(text.count(b"]", a, b) for a, b in _blocks(start, end))


def _without_data(text: bytes) -> bytes:
    """``text`` with every list of numbers under a "data" key replaced by ``null``.

    The header that is left is a few hundred bytes whatever the tensors' size, so it parses in
    microseconds: a request is judged on its shapes before its values cost time and memory. A
    list holding anything else (a string, an object) is left as it is, for the full parse to
    refuse. Only a list the parser would read as one value is cut: in valid JSON a list of
    numbers ends at the last "]" before the next key or "}", and its brackets balance.
    """
    parts, done, pos = [], 0, 0
    while match := _DATA_LIST.search(text, pos):
        start = match.end()
        end = text.rfind(b"]", start, _numbers_end(text, start)) + 1
        if end <= start or not _balanced(text, start, end):
            pos = start + 1  # not a list of numbers: left in, the search goes on inside it
            continue
        parts += [text[done:start], b"null"]
        done = pos = end
    if not parts:
        return text
    parts.append(text[done:])
    return b"".join(parts)


def _load_json(text: bytes, load: Callable[[bytes], Any] = json.loads) -> Any:
    try:
        return load(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"malformed JSON in the request header: {e}") from None
    except RecursionError:
        raise BadRequest(
            "the request header is nested too deeply to be an inference request"
        ) from None


E = TypeVar("E")


class HeaderCache(Generic[E]):
    """Checked request headers by their bytes (HTTP: the JSON text; gRPC:
    ``grpc_codec.header_key``): the most recent ``size`` of them.

    A client sends the same header again and again (perf_analyzer; a service calling one model
    with a few shapes), so parsing it, checking its fields and the server's ``check_header``
    run once per distinct header. Only a short header (``max_text`` bytes) without tensor values
    that passed the check is kept; what is kept is shared between requests, never changed.
    """

    def __init__(self, size: int = 1024, max_text: int = 4096) -> None:
        self.size, self.max_text = size, max_text  # at most ~4 MB of keys in all
        self._entries: OrderedDict[bytes, E] = OrderedDict()

    def get(self, text: bytes) -> E | None:
        entry = self._entries.get(text)
        if entry is not None:
            self._entries.move_to_end(text)
        return entry

    def put(self, text: bytes, entry: E) -> None:
        """Keep ``entry`` under ``text``, unless ``text`` is longer than ``max_text``."""
        if len(text) > self.max_text:
            return
        self._entries[text] = entry
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)


def _parse_header(
    text: bytes,
    check_header: Callable[[RequestHeader], None] | None,
    load: Callable[[bytes], Any],
    cache: HeaderCache[tuple[Any, RequestHeader]] | None,
) -> tuple[Any, RequestHeader]:
    """The header's JSON and its fields, checked by ``check_header`` before its tensors' values
    are parsed."""
    cached = cache.get(text) if cache is not None else None
    if cached is not None:
        return cached
    # The header without its tensors' values first (small: json.loads at once), checked; the
    # whole of it only then. With nothing cut out, one parse is all there is to do.
    skeleton = _without_data(text)
    header = _load_json(skeleton, json.loads if skeleton is not text else load)
    head = _read_header(header)
    if check_header is not None:
        check_header(head)
    if skeleton is not text:
        header = _load_json(text, load)
        return header, _read_header(header)
    if cache is not None and not any("data" in i for i in header["inputs"]):
        cache.put(text, (header, head))
    return header, head


def parse_infer_request(
    body: bytes,
    header_length: int | None = None,
    check_header: Callable[[RequestHeader], None] | None = None,
    load_json: Callable[[bytes], Any] | None = None,
    cache: HeaderCache[tuple[Any, RequestHeader]] | None = None,
) -> InferRequest:
    """Parse an inference body; ``header_length`` from ``Inference-Header-Content-Length``.

    ``check_header`` sees the request's header before any tensor is decoded: whatever it
    raises refuses the request at the cost of parsing its header alone.
    ``load_json`` parses the whole header once it is checked (default ``json.loads``); for large
    bodies ``largejson.loads_header``, which decodes the ``data`` lists itself, in small steps.
    ``cache``: headers already parsed and checked, by ``check_header`` (always the same one).
    """
    if header_length is not None and not 0 <= header_length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes")
    split = len(body) if header_length is None else header_length
    header, head = _parse_header(body[:split], check_header, load_json or json.loads, cache)
    binary, offset, inputs = memoryview(body)[split:], 0, []
    for item, spec in zip(header["inputs"], head.inputs, strict=True):
        tensor, offset = _input_tensor(item, spec, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data after the inputs belong to no input"
        )
    return InferRequest(tuple(inputs), head.outputs, head.id, head.parameters)


def _response_head(
    model_name: str, model_version: str, request_id: str | None, outputs: list[dict[str, Any]]
) -> bytes:
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = outputs
    return json.dumps(header, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=1024)
def _binary_response_head(
    model_name: str, model_version: str, outputs: tuple[tuple[str, np.dtype, tuple[int, ...]], ...]
) -> bytes:
    """The header of a response that echoes no id and whose outputs are all binary numbers: the
    same for every response of these shapes (json.dumps is most of encoding a small one)."""
    described = [
        {
            "name": name,
            "datatype": codecs.datatype_of(dtype),
            "shape": list(shape),
            "parameters": {"binary_data_size": dtype.itemsize * math.prod(shape)},
        }
        for name, dtype, shape in outputs
    ]
    return _response_head(model_name, model_version, None, described)


def encode_infer_response(
    response: InferResponse, encode_json: Callable[[np.ndarray], Any] = codecs.encode_json
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary outputs follow the JSON header).

    ``encode_json`` makes an output's ``data`` (``largejson`` passes a stand-in for text it
    writes itself, in small steps).
    """
    outputs = response.outputs
    if response.id is None and all(o.binary and o.data.dtype.kind in "biuf" for o in outputs):
        key = tuple((o.name, o.data.dtype, o.data.shape) for o in outputs)
        head = _binary_response_head(response.model_name, response.model_version, key)
        blobs = [codecs.encode_bytes(o.data) for o in outputs]
    else:
        described, blobs = [], []
        for out in outputs:
            entry: dict[str, Any] = {
                "name": out.name,
                "datatype": codecs.datatype_of(out.data.dtype),
                "shape": list(out.data.shape),
            }
            if out.binary:
                blob = codecs.encode_bytes(out.data)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = encode_json(out.data)
            described.append(entry)
        head = _response_head(response.model_name, response.model_version, response.id, described)
    if not blobs:
        return head, {"Content-Type": JSON_CONTENT_TYPE}
    headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}
    return b"".join([head, *blobs]), headers


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
