"""The batching core: merge requests of different lengths into one padded batch, split it back.

Plain numpy, no server: the HTTP server's dynamic batcher uses it, and so can a Triton
python-backend ``model.py`` (whose ``execute(requests)`` gets a list of requests to run at once)::

    from lstm_deploy_serving.batching import fill_defaults, pad_and_merge, split

    items = [fill_defaults(inputs, state_shapes) for inputs in per_request_inputs]
    merged, plan = pad_and_merge(items)
    outputs = session.run(None, merged)                     # one run for every request
    per_request = split(dict(zip(output_names, outputs)), plan)

Every tensor is batch first (the deployed signature). ``input`` is zero-padded on its time axis
to the longest request and each request's own ``lengths`` go along, so the LSTM stops at each
sequence's end: ``hn``/``cn`` are the state after the last valid step and ``output`` is zero past
it. ``split`` cuts ``output`` back to each request's own time steps, so a request's result has
the same shapes (and values, up to float rounding of a bigger matrix product) as if it had run
alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BadRequest

BATCH_AXIS = 0
TIME_AXIS = 1
SEQUENCE_INPUTS = ("input",)  # tensors with a time axis: padded on merge
SEQUENCE_OUTPUTS = ("output",)  # cut back to each request's steps on split

Tensors = Mapping[str, np.ndarray]


def check_lengths(tensors: Tensors) -> None:
    """BadRequest unless ``input`` has time steps and every given length is within them."""
    steps = tensors["input"].shape[TIME_AXIS]
    if steps < 1:
        raise BadRequest("input 'input' has 0 time steps: a sequence needs at least 1")
    lengths = tensors.get("lengths")
    if lengths is not None and lengths.size and (lengths.min() < 1 or lengths.max() > steps):
        raise BadRequest(
            f"lengths must be in [1, {steps}] (the input's time steps); "
            f"got values from {lengths.min()} to {lengths.max()}"
        )


@dataclass(frozen=True)
class MergePlan:
    """Where each request sits in a merged batch.

    Attributes:
        rows: per request, its rows ``[start, stop)`` in the merged batch.
        steps: per request, its own time steps (``input.shape[1]``).
    """

    rows: tuple[tuple[int, int], ...]
    steps: tuple[int, ...]

    @property
    def batch_size(self) -> int:
        return self.rows[-1][1] if self.rows else 0

    @property
    def max_steps(self) -> int:
        return max(self.steps, default=0)


def fill_defaults(
    inputs: Tensors, state_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Complete one request's inputs: ``lengths`` = full length, missing states = zeros.

    Args:
        inputs: ``input`` (B, T, input_size) and any of ``lengths`` (B,), ``h0``, ``c0``.
        state_shapes: the per-row state shapes, e.g. ``{"h0": (L, H_out), "c0": (L, H)}``.
    """
    x = inputs["input"]
    batch, steps = x.shape[:2]
    out = dict(inputs)
    if "lengths" not in out:
        out["lengths"] = np.full(batch, steps, dtype=np.int64)
    for name, shape in state_shapes.items():
        if name not in out:
            out[name] = np.zeros((batch, *shape), dtype=np.float32)
    return out


def pad_and_merge(
    requests: Sequence[Tensors], sequence_inputs: Sequence[str] = SEQUENCE_INPUTS
) -> tuple[dict[str, np.ndarray], MergePlan]:
    """Merge complete requests (every input present) into one batch.

    Returns:
        The merged inputs (tensors in ``sequence_inputs`` zero-padded on the time axis to the
        longest request, everything concatenated on the batch axis) and the plan ``split``
        needs. A single request is returned as it is, without a copy.
    """
    if not requests:
        raise ValueError("pad_and_merge needs at least one request")
    first = requests[0]
    time_name = sequence_inputs[0]
    steps = tuple(int(r[time_name].shape[TIME_AXIS]) for r in requests)
    rows, start = [], 0
    for r in requests:
        stop = start + int(r[time_name].shape[BATCH_AXIS])
        rows.append((start, stop))
        start = stop
    plan = MergePlan(tuple(rows), steps)
    if len(requests) == 1:
        return dict(first), plan
    merged: dict[str, np.ndarray] = {}
    for name in first:
        parts = [r[name] for r in requests]
        if name in sequence_inputs:
            shape = (plan.batch_size, plan.max_steps, *parts[0].shape[2:])
            out = np.zeros(shape, dtype=parts[0].dtype)
            for (lo, hi), part in zip(rows, parts, strict=True):
                out[lo:hi, : part.shape[TIME_AXIS]] = part
            merged[name] = out
        else:
            merged[name] = np.concatenate(parts, axis=BATCH_AXIS)
    return merged, plan


def split(
    outputs: Tensors, plan: MergePlan, sequence_outputs: Sequence[str] = SEQUENCE_OUTPUTS
) -> list[dict[str, np.ndarray]]:
    """Cut a merged run's outputs back into one dict per request, in the order merged."""
    results = []
    for (lo, hi), steps in zip(plan.rows, plan.steps, strict=True):
        one = {}
        for name, value in outputs.items():
            part = value[lo:hi]
            one[name] = part[:, :steps] if name in sequence_outputs else part
        results.append(one)
    return results
