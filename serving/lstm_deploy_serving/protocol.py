"""KServe v2 / Open Inference Protocol wire types, as Triton speaks them over HTTP.

An inference body is a JSON header, optionally followed by raw tensor bytes (Triton's binary
tensor extension): the ``Inference-Header-Content-Length`` HTTP header gives the JSON's length,
and each binary input says how many of the following bytes are its own with the
``binary_data_size`` parameter, in the order of ``inputs``. Responses mirror that: an output asked
for with ``binary_data`` (or every output, under the request parameter ``binary_data_output``)
travels as bytes after the JSON.

This module turns bodies into typed requests and typed responses into bodies; it knows nothing
about the model (the service checks names, datatypes and shapes against the signature).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import codecs
from .errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    inputs: tuple[InputTensor, ...]
    # None: every output of the model, in binary iff ``binary_output``.
    outputs: tuple[RequestedOutput, ...] | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_output(self) -> bool:
        return bool(self.parameters.get("binary_data_output", False))


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


def _parse_input(item: Any, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    item = _object(item, "each of 'inputs'")
    name, datatype = item.get("name"), item.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise BadRequest("each input needs a string 'name' and 'datatype'")
    shape = codecs.check_shape(name, item.get("shape"))
    params = _object(item.get("parameters", {}), f"input '{name}': parameters")
    if "shared_memory_region" in params:
        raise BadRequest(f"input '{name}': shared memory is not supported by this server")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in item:
            raise BadRequest(f"input '{name}': give either 'data' or binary_data_size, not both")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise BadRequest(
                f"input '{name}': binary_data_size {size} goes past the end of the body "
                f"({len(binary) - offset} bytes left): truncated binary data"
            )
        data = codecs.decode_bytes(name, datatype, shape, binary[offset : offset + size])
        return InputTensor(name, datatype, shape, data), offset + size
    if "data" not in item:
        raise BadRequest(f"input '{name}': no 'data' and no binary_data_size")
    data = codecs.decode_json(name, datatype, shape, item["data"])
    return InputTensor(name, datatype, shape, data), offset


def _parse_output(item: Any, default_binary: bool) -> RequestedOutput:
    item = _object(item, "each of 'outputs'")
    name = item.get("name")
    if not isinstance(name, str):
        raise BadRequest("each requested output needs a string 'name'")
    params = _object(item.get("parameters", {}), f"output '{name}': parameters")
    if "shared_memory_region" in params or "classification" in params:
        raise BadRequest(f"output '{name}': shared memory and classification are not supported")
    return RequestedOutput(name, bool(params.get("binary_data", default_binary)))


def parse_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an inference body; ``header_length`` from ``Inference-Header-Content-Length``."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes")
    split = len(body) if header_length is None else header_length
    try:
        header = json.loads(body[:split])
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"malformed JSON in the request header: {e}") from None
    header = _object(header, "the request")
    parameters = _object(header.get("parameters", {}), "'parameters'")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("the request needs a non-empty list 'inputs'")
    binary, offset, inputs = memoryview(body)[split:], 0, []
    for item in raw_inputs:
        tensor, offset = _parse_input(item, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data after the inputs belong to no input"
        )
    names = [t.name for t in inputs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadRequest(f"duplicate inputs: {', '.join(duplicates)}")
    outputs = None
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list):
            raise BadRequest("'outputs' must be a list")
        default = bool(parameters.get("binary_data_output", False))
        outputs = tuple(_parse_output(item, default) for item in header["outputs"])
        wanted = [o.name for o in outputs]
        if len(set(wanted)) != len(wanted):
            raise BadRequest("an output is requested more than once")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    return InferRequest(tuple(inputs), outputs, request_id, parameters)


def encode_infer_response(response: InferResponse) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary outputs follow the JSON header)."""
    described, blobs = [], []
    for out in response.outputs:
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
            entry["data"] = codecs.encode_json(out.data)
        described.append(entry)
    header: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id is not None:
        header["id"] = response.id
    header["outputs"] = described
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": JSON_CONTENT_TYPE}
    headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}
    return b"".join([head, *blobs]), headers


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
