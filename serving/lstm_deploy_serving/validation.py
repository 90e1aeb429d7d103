"""Check a request's tensors against the deployed signature, with Triton's wording.

Every check names the tensor, what the model expects and what came, so a client can fix the
request from the message alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lstm_deploy.bundle import INPUT, TensorSpec

from . import codecs
from .batching import check_lengths
from .errors import BadRequest
from .model_spec import ModelSpec
from .protocol import InputTensor

REQUIRED = (INPUT,)


def _signature_form(t: InputTensor, spec: TensorSpec) -> InputTensor:
    # Triton's configs declare a [batch] tensor (lengths) as dims [1] reshaped away, so Triton
    # clients send [batch, 1]: accept that form too, so the same client code works on both servers.
    if len(spec.shape) == 1 and len(t.shape) == 2 and t.shape[1] == 1:
        return dataclasses.replace(t, shape=t.shape[:1], data=t.data.reshape(-1))
    return t


def _check_tensor(t: InputTensor, spec: TensorSpec, model: str) -> None:
    expected = codecs.datatype_of(spec.dtype)
    if t.datatype != expected:
        raise BadRequest(
            f"inference input '{t.name}' data-type is '{t.datatype}', "
            f"but model '{model}' expects '{expected}'"
        )
    fixed_ok = all(
        isinstance(want, str) or want == got for want, got in zip(spec.shape, t.shape, strict=False)
    )
    if len(t.shape) != len(spec.shape) or not fixed_ok:
        expected = ",".join(str(d) for d in spec.wire_shape)
        got = ",".join(str(d) for d in t.shape)
        raise BadRequest(
            f"unexpected shape for input '{t.name}' for model '{model}'. "
            f"Expected [{expected}], got [{got}]"
        )


def check_inputs(
    inputs: Sequence[InputTensor],
    spec: ModelSpec,
    *,
    model: str,
    max_batch_size: int,
    max_steps: int,
) -> dict[str, np.ndarray]:
    """The request's tensors by name, each checked; BadRequest on the first problem.

    ``input`` is required; ``lengths``, ``h0``, ``c0`` are optional (filled in later).
    """
    known = {t.name: t for t in spec.inputs}
    for t in inputs:
        if t.name not in known:
            raise BadRequest(
                f"unexpected inference input '{t.name}' for model '{model}' "
                f"(its inputs: {', '.join(known)})"
            )
    inputs = [_signature_form(t, known[t.name]) for t in inputs]
    for t in inputs:
        _check_tensor(t, known[t.name], model)
    tensors = {t.name: t.data for t in inputs}
    for name in REQUIRED:
        if name not in tensors:
            raise BadRequest(f"expected input '{name}' for model '{model}', got none")
    x = tensors[INPUT]
    batch, steps = x.shape[:2]
    if batch < 1:
        raise BadRequest("inference request batch-size must be at least 1")
    if batch > max_batch_size:
        raise BadRequest(
            f"inference request batch-size must be <= {max_batch_size} for '{model}', got {batch}"
        )
    for name, value in tensors.items():
        if value.shape[0] != batch:
            raise BadRequest(
                f"input '{name}' has batch size {value.shape[0]}, but 'input' has {batch}"
            )
    check_lengths(tensors)
    if steps > max_steps:
        raise BadRequest(
            f"input 'input' has {steps} time steps, above this server's maximum of {max_steps} "
            "(--max-sequence-length)"
        )
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise BadRequest(f"input '{name}' contains NaN or Inf")
    return tensors
