"""Check a request's tensors against the deployed signature, with Triton's wording.

Every check names the tensor, what the model expects and what came, so a client can fix the
request from the message alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

from lstm_deploy.bundle import BATCH, SEQUENCE, TensorSpec

from . import codecs
from .errors import BadRequest
from .model_spec import ModelSpec
from .protocol import InputTensor, TensorHeader

T = TypeVar("T", bound=TensorHeader)


def _fits(pattern: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether ``shape`` has ``pattern``'s rank and its fixed sizes (-1: any size)."""
    return len(pattern) == len(shape) and all(p in (-1, d) for p, d in zip(pattern, shape))


def _signature_form(t: T, spec: TensorSpec, model: ModelSpec) -> T:
    """``t`` in the signature's shape. A client may send either form, when they differ:

    - Triton's (the model metadata's, batch axis + config dims), reshaped as the config's
      ``reshape`` says, as Triton reshapes it for its backends: ``lengths`` [batch, 1] -> [batch]
      (what tritonclient and perf_analyzer send, read from the metadata);
    - the signature's own, [batch], which this server took before its metadata said [-1, 1],
      and which model.onnx, the C++ programs and README's examples use: refusing it would break
      those clients for no gain, and the two forms differ in rank, so neither is ambiguous.
    """
    wire = model.wire_shape(spec.name)
    if len(wire) == len(spec.shape) or not _fits(wire, t.shape):
        return t
    rest = [d for d in spec.shape[1:] if isinstance(d, int)]
    fixed = (t.shape[0], *rest)
    if len(rest) != len(spec.shape) - 1 or math.prod(fixed) != math.prod(t.shape):
        return t  # not a pure reshape: left as sent, for _check_tensor to refuse
    if isinstance(t, InputTensor):
        return dataclasses.replace(t, shape=fixed, data=t.data.reshape(fixed))
    return dataclasses.replace(t, shape=fixed)


def _check_tensor(t: TensorHeader, spec: TensorSpec, model: ModelSpec, name: str) -> None:
    expected = codecs.datatype_of(spec.dtype)
    if t.datatype != expected:
        raise BadRequest(
            f"inference input '{t.name}' data-type is '{t.datatype}', "
            f"but model '{name}' expects '{expected}'"
        )
    if not _fits(model.dynamic_shapes[spec.name], t.shape):
        forms = [model.wire_shape(spec.name), model.dynamic_shapes[spec.name]]
        expected = " or ".join(f"[{','.join(str(d) for d in f)}]" for f in dict.fromkeys(forms))
        got = ",".join(str(d) for d in t.shape)
        raise BadRequest(
            f"unexpected shape for input '{t.name}' for model '{name}'. "
            f"Expected {expected}, got [{got}]"
        )


def check_header(
    inputs: Sequence[TensorHeader],
    spec: ModelSpec,
    *,
    model: str,
    max_batch_size: int,
    max_steps: int,
) -> dict[str, int]:
    """BadRequest on the first problem the request's names, datatypes and shapes show; else the
    size of each named axis (``batch``, ``sequence``).

    Needs no tensor values: the service runs it on the request's header, before any is decoded.
    """
    known = spec.input_specs
    for t in inputs:
        if t.name not in known:
            raise BadRequest(
                f"unexpected inference input '{t.name}' for model '{model}' "
                f"(its inputs: {', '.join(known)})"
            )
    shapes = {}
    for t in inputs:
        t = _signature_form(t, known[t.name], spec)
        _check_tensor(t, known[t.name], spec, model)
        shapes[t.name] = t.shape
    for name in spec.required:
        if name not in shapes:
            raise BadRequest(f"expected input '{name}' for model '{model}', got none")
    sizes = spec.layout.axis_sizes(shapes)
    batch = sizes[BATCH]
    if batch < 1:
        raise BadRequest("inference request batch-size must be at least 1")
    if batch > max_batch_size:
        raise BadRequest(
            f"inference request batch-size must be <= {max_batch_size} for '{model}', got {batch}"
        )
    steps = sizes.get(SEQUENCE, 0)
    if steps > max_steps:
        name = next(t.name for t in spec.inputs if t.name in shapes and SEQUENCE in t.shape)
        raise BadRequest(
            f"input '{name}' has {steps} time steps, above this server's maximum of {max_steps} "
            "(--max-sequence-length)"
        )
    return sizes


def input_values(inputs: Sequence[InputTensor], spec: ModelSpec) -> dict[str, np.ndarray]:
    """The request's tensors by name, in the signature's form; BadRequest on bad values.

    Their names, datatypes and shapes are ``check_header``'s, run before they were decoded:
    the values are checked here (lengths within the time steps, integer inputs within their
    ranges: ``Layout.check``), and floats for NaN or Inf. The optional inputs (lengths, states)
    may be absent: each request gets its defaults later.
    """
    known = spec.input_specs
    tensors = {t.name: _signature_form(t, known[t.name], spec).data for t in inputs}
    spec.layout.check(tensors)
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise BadRequest(f"input '{name}' contains NaN or Inf")
    return tensors


def response_size(
    sizes: Mapping[str, int], outputs: Sequence[tuple[str, bool]], spec: ModelSpec
) -> int:
    """The most bytes the ``(name, binary)`` outputs can take, given the size of each named
    axis (``check_header``'s): an output's dynamic axes (batch, sequence) are the inputs'."""
    total = 0
    for name, binary in outputs:
        out = spec.output_specs[name]
        count = math.prod(sizes[d] if isinstance(d, str) else d for d in out.shape)
        total += codecs.encoded_size(np.dtype(out.dtype), count, binary)
    return total


def check_response_size(
    sizes: Mapping[str, int],
    outputs: Sequence[tuple[str, bool]],
    spec: ModelSpec,
    *,
    limit: int,
) -> None:
    """BadRequest, before any work, if the response could pass ``limit`` bytes."""
    size = response_size(sizes, outputs, spec)
    if size <= limit:
        return
    as_json = [name for name, binary in outputs if not binary]
    advice = (
        "ask for fewer outputs or binary data"
        if as_json
        else "ask for fewer outputs, or send fewer rows or time steps"
    )
    listed = ", ".join(f"{name} ({'binary' if binary else 'JSON'})" for name, binary in outputs)
    raise BadRequest(
        f"the response would take up to {size} bytes ({listed}), over this server's limit of "
        f"{limit} bytes (--max-response-bytes): {advice}"
    )
