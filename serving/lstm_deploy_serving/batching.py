"""The batching core: merge requests into one batch, split the outputs back, as the model allows.

Plain numpy, no server, no lstm_deploy: the HTTP server's dynamic batcher uses it, and so does
the bundle's Triton python-backend ``model.py`` (whose ``execute(requests)`` gets a list of
requests to run at once), from a copy of this file::

    layout = Layout.from_json(info)           # dataclasses.asdict(bundle.info), as data
    items = [layout.fill_defaults(inputs) for inputs in per_request_inputs]
    for group in layout.groups(items):        # requests that can share a run
        merged, plan = layout.merge([items[i] for i in group])
        outputs = session.run(None, merged)
        per_request = layout.split(dict(zip(output_names, outputs)), plan)

Every tensor is batch first. A model that declares a lengths input (``Layout.lengths``) is
padded along its ``sequence`` axis: every input with that axis is padded to the longest request
(floats with 0, integers with their range's low end, else 0) and each request's own lengths go
along, so the model stops at each sequence's end; ``split`` cuts every output with a ``sequence``
axis back to each request's own steps. A request's result has the same shapes (and values, up to
float rounding of a bigger matrix product) as if it had run alone. A model without lengths sees
every sequence whole, so padding would change its results: only requests of equal shapes merge.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from .errors import BadRequest

BATCH_AXIS = 0
SEQUENCE = "sequence"  # the named axis that padding extends

Tensors = Mapping[str, np.ndarray]
Dim = int | str  # an int is fixed, a str names a dynamic axis


@dataclass(frozen=True)
class Tensor:
    """One tensor of the signature: its name, numpy dtype and shape (named dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @cached_property
    def sequence_axis(self) -> int | None:
        return self.shape.index(SEQUENCE) if SEQUENCE in self.shape else None


@dataclass(frozen=True)
class MergePlan:
    """Where each request sits in a merged batch.

    Attributes:
        rows: per request, its rows ``[start, stop)`` in the merged batch.
        steps: per request, its own size of the ``sequence`` axis (0 without one).
    """

    rows: tuple[tuple[int, int], ...]
    steps: tuple[int, ...]

    @property
    def batch_size(self) -> int:
        return self.rows[-1][1] if self.rows else 0

    @property
    def max_steps(self) -> int:
        return max(self.steps, default=0)


@dataclass(frozen=True)
class Layout:
    """What batching and streaming need to know of a model, alike for every kind of bundle.

    The same facts as ``lstm_deploy.bundle.ModelInfo``, read from its ``dataclasses.asdict``
    form (``from_json``), so that code which cannot import lstm_deploy reads them too.

    Attributes:
        inputs, outputs: the signature's tensors, in order.
        lengths: the input (int64 [batch]) carrying each sequence's length, or None.
        ranges: each integer input's values, [low, high).
        state: each LSTM's (h0, c0, hn, cn) tensor names: what a stream carries between chunks.
        streamable: whether a sequence may come in chunks, each LSTM's (h, c) carried.
    """

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    lengths: str | None = None
    ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    state: tuple[tuple[str, str, str, str], ...] = ()
    streamable: bool = False

    @classmethod
    def from_json(cls, info: Mapping[str, Any]) -> Layout:
        """The layout of a ModelInfo as data (``dataclasses.asdict(info)``, or it read back)."""

        def tensors(side: str) -> tuple[Tensor, ...]:
            return tuple(
                Tensor(t["name"], t["dtype"], tuple(t["shape"])) for t in info["signature"][side]
            )

        return cls(
            tensors("inputs"),
            tensors("outputs"),
            info.get("lengths"),
            {name: (int(lo), int(hi)) for name, (lo, hi) in (info.get("ranges") or {}).items()},
            tuple((s["h0"], s["c0"], s["hn"], s["cn"]) for s in info.get("state") or ()),
            bool(info.get("streamable", False)),
        )

    # Per-request code reads these: each is worked out once (a Layout is frozen).
    @cached_property
    def state_inputs(self) -> tuple[str, ...]:
        return tuple(n for h0, c0, _, _ in self.state for n in (h0, c0))

    @cached_property
    def optional(self) -> tuple[str, ...]:
        """The inputs a request may leave out: lengths (full length) and states (zeros)."""
        return (*((self.lengths,) if self.lengths else ()), *self.state_inputs)

    @cached_property
    def required(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs if t.name not in self.optional)

    @cached_property
    def _by_name(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.inputs}

    def input(self, name: str) -> Tensor:
        return self._by_name[name]

    # -- one request -----------------------------------------------------------------------

    @cached_property
    def _named_axes(self) -> tuple[tuple[str, tuple[tuple[int, str], ...]], ...]:
        """Per input, in signature order: its name and its named axes (index, name)."""
        return tuple(
            (t.name, tuple((i, d) for i, d in enumerate(t.shape) if isinstance(d, str)))
            for t in self.inputs
        )

    def axis_sizes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """Each named axis's size in one request's inputs (by name, present ones, of the
        signature's ranks); BadRequest if two inputs disagree on one (the first in signature
        order is the one to match)."""
        sizes: dict[str, tuple[int, str]] = {}
        for name, axes in self._named_axes:
            shape = shapes.get(name)
            if shape is None:
                continue
            for i, axis in axes:
                size = int(shape[i])
                first = sizes.setdefault(axis, (size, name))
                if first[0] != size:
                    raise BadRequest(
                        f"input '{name}' has {axis} size {size}, but '{first[1]}' has {first[0]}"
                    )
        return {axis: size for axis, (size, _) in sizes.items()}

    def check(self, tensors: Tensors) -> None:
        """BadRequest unless a request's values fit: at least one step, each length in [1, T]
        (T: the request's size of the ``sequence`` axis), integer inputs within their range."""
        sizes = self.axis_sizes({n: v.shape for n, v in tensors.items()})
        steps = sizes.get(SEQUENCE)
        if steps is not None and steps < 1:
            name = next(t.name for t in self.inputs if t.sequence_axis is not None)
            raise BadRequest(f"input '{name}' has 0 time steps: a sequence needs at least 1")
        lengths = tensors.get(self.lengths) if self.lengths else None
        if (
            lengths is not None
            and lengths.size
            and (lengths.min() < 1 or (steps is not None and lengths.max() > steps))
        ):
            raise BadRequest(
                f"{self.lengths} must be in [1, {steps or 'T'}] (the input's time steps); "
                f"got values from {lengths.min()} to {lengths.max()}"
            )
        for name, (low, high) in self.ranges.items():
            value = tensors.get(name)
            if value is None or not value.size:
                continue
            bad = np.unique(value[(value < low) | (value >= high)])
            if bad.size:
                found = ", ".join(str(v) for v in bad[:5]) + (" ..." if bad.size > 5 else "")
                raise BadRequest(f"input '{name}' must hold values in [{low}, {high}); got {found}")

    def fill_defaults(self, inputs: Tensors) -> dict[str, np.ndarray]:
        """Complete one request's inputs: lengths = full length, missing states = zeros."""
        sizes = self.axis_sizes({n: v.shape for n, v in inputs.items()})
        out = dict(inputs)
        for name in self.optional:
            if name in out:
                continue
            spec = self.input(name)
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
            if name == self.lengths:
                out[name] = np.full(shape, sizes.get(SEQUENCE, 1), dtype=spec.dtype)
            else:
                out[name] = np.zeros(shape, dtype=spec.dtype)
        return out

    def zero_state(self) -> dict[str, np.ndarray]:
        """Every LSTM's (h, c) at a sequence's start, batch 1: zeros, by state input."""
        return {
            name: np.zeros((1, *(int(d) for d in spec.shape[1:])), spec.dtype)
            for name in self.state_inputs
            for spec in [self.input(name)]
        }

    def carried(self, outputs: Tensors) -> dict[str, np.ndarray]:
        """The state a chunk's outputs hand to the next chunk, by state input (copies: the
        outputs may be views into a whole merged batch)."""
        return {
            name: outputs[out].copy()
            for h0, c0, hn, cn in self.state
            for name, out in ((h0, hn), (c0, cn))
        }

    def rows(self, inputs: Tensors) -> int:
        return int(next(iter(inputs.values())).shape[BATCH_AXIS])

    def steps(self, inputs: Tensors) -> int:
        """A request's size of the ``sequence`` axis (0 if no input has one)."""
        for spec in self.inputs:
            axis = spec.sequence_axis
            if axis is not None and spec.name in inputs:
                return int(inputs[spec.name].shape[axis])
        return 0

    def key(self, inputs: Tensors) -> Hashable:
        """Requests with equal keys can share a run: their shapes past the batch axis are equal,
        but for the ``sequence`` axis where the model takes lengths (merging pads it)."""
        key = []
        for spec in self.inputs:
            shape = list(inputs[spec.name].shape) if spec.name in inputs else None
            if shape is not None:
                del shape[BATCH_AXIS]
                if self.lengths is not None and spec.sequence_axis is not None:
                    del shape[spec.sequence_axis - 1]
            key.append(None if shape is None else tuple(shape))
        return tuple(key)

    def groups(self, requests: Sequence[Tensors]) -> list[list[int]]:
        """The requests' indices, grouped by ``key`` in order of first arrival."""
        groups: dict[Hashable, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(self.key(request), []).append(i)
        return list(groups.values())

    # -- many requests ---------------------------------------------------------------------

    def merge(self, requests: Sequence[Tensors]) -> tuple[dict[str, np.ndarray], MergePlan]:
        """Merge complete requests (every input present, equal ``key``s) into one batch.

        Returns:
            The merged inputs (padded on the ``sequence`` axis to the longest request where the
            model takes lengths, concatenated on the batch axis) and the plan ``split`` needs.
            A single request is returned as it is, without a copy.
        """
        if not requests:
            raise ValueError("merge needs at least one request")
        if len({self.key(r) for r in requests}) > 1:
            raise ValueError("merge needs requests of equal keys (see Layout.key)")
        steps = tuple(self.steps(r) for r in requests)
        rows, start = [], 0
        for r in requests:
            rows.append((start, start + self.rows(r)))
            start = rows[-1][1]
        plan = MergePlan(tuple(rows), steps)
        if len(requests) == 1:
            return dict(requests[0]), plan
        merged: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            parts = [r[spec.name] for r in requests]
            axis = spec.sequence_axis
            if axis is None or self.lengths is None or len(set(steps)) == 1:
                merged[spec.name] = np.concatenate(parts, axis=BATCH_AXIS)
                continue
            shape = list(parts[0].shape)
            shape[BATCH_AXIS], shape[axis] = plan.batch_size, plan.max_steps
            pad = self.ranges[spec.name][0] if spec.name in self.ranges else 0
            out = np.full(shape, pad, dtype=parts[0].dtype)
            for (lo, hi), part in zip(rows, parts, strict=True):
                out[_within(axis, lo, hi, part.shape[axis])] = part
            merged[spec.name] = out
        return merged, plan

    def split(self, outputs: Tensors, plan: MergePlan) -> list[dict[str, np.ndarray]]:
        """Cut a merged run's outputs back into one dict per request, in the order merged."""
        axes = {t.name: t.sequence_axis for t in self.outputs}
        results = []
        for (lo, hi), steps in zip(plan.rows, plan.steps, strict=True):
            one = {}
            for name, value in outputs.items():
                axis = axes.get(name)
                cut = axis is not None and value.shape[axis] != steps
                one[name] = value[_within(axis, lo, hi, steps)] if cut else value[lo:hi]
            results.append(one)
        return results


def _within(axis: int | None, lo: int, hi: int, steps: int) -> tuple[slice, ...]:
    """Rows [lo, hi) and, on ``axis``, the first ``steps`` entries."""
    index = [slice(lo, hi)]
    if axis is not None:
        index += [slice(None)] * (axis - 1) + [slice(0, steps)]
    return tuple(index)
