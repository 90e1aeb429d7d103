"""The signature of a whole model: inputs from the examples, outputs from running it.

`plan` reads the user's example inputs (names in forward's order, dtypes, ranks, fixed sizes,
dynamic axes, the lengths input, integer ranges); `output_axes` runs the model at two sizes and
names each output axis after the input axis it follows; `check_streamable` runs it whole and in
two chunks, the state carried, and refuses streaming unless they agree.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lstm_deploy.bundle import BATCH, SEQUENCE, Signature, StateSpec, TensorSpec
from lstm_deploy.model import LSTM
from lstm_deploy_export.export.graphs import ExportError
from lstm_deploy_export.export.taps import Flat, _running, _where, _why

# The sizes the graphs are captured at, and the second probe that tells each output axis's origin:
# neither 0 nor 1 (torch.export specializes those), and every size differs from every other.
CAPTURE = {BATCH: 2, SEQUENCE: 3}
PROBE = {BATCH: 3, SEQUENCE: 5}
_OTHER_AXIS_PROBE = (4, 6)  # a dynamic axis with another name: its sizes at capture and probe
FLOATS = frozenset({torch.float16, torch.float32, torch.float64})
DTYPES = {torch.float32: "float32", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool"}


@dataclasses.dataclass
class Plan:
    names: list[str]
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]  # the user's examples'
    axes: dict[str, dict[int, str]]  # input -> {axis: name}
    lengths: str | None
    ranges: dict[str, tuple[int, int]]

    def sizes(self, which: dict[str, int]) -> dict[str, int]:
        other = sorted({a for ax in self.axes.values() for a in ax.values()} - set(CAPTURE))
        pick = _OTHER_AXIS_PROBE[0 if which is CAPTURE else 1]
        return {**which, **{name: pick for name in other}}

    def inputs(self, sizes: dict[str, int], seed: int = 0) -> list[Tensor]:
        """Inputs of these axis sizes: floats N(0, 1), integers in range, lengths all T."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for name in self.names:
            shape = [sizes[self.axes[name][i]] if i in self.axes[name] else d
                     for i, d in enumerate(self.shapes[name])]  # fmt: skip
            dtype = self.dtypes[name]
            if name == self.lengths:
                out.append(torch.full(shape, sizes[SEQUENCE], dtype=dtype))
            elif dtype in FLOATS:
                out.append(torch.randn(shape, generator=g).to(torch.float32))
            elif dtype == torch.bool:
                out.append(torch.randint(0, 2, shape, generator=g).bool())
            else:
                low, high = self.ranges[name]
                out.append(torch.randint(low, high, shape, generator=g, dtype=dtype))
        return out


def make_plan(
    model: nn.Module,
    examples: Mapping[str, Tensor],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    lengths: str | None,
    input_ranges: Mapping[str, tuple[int, int]] | None,
) -> Plan:
    if not isinstance(examples, Mapping) or not examples:
        raise ExportError("example_inputs must be a dict of named tensors, e.g. {'input': x}")
    names = list(examples)
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if names != params[: len(names)]:
        raise ExportError(
            f"example_inputs are {names}; they must be forward's first parameters, in its order: "
            f"{params}"
        )
    for name, t in examples.items():
        if not isinstance(t, Tensor):
            raise ExportError(f"example input '{name}' is a {type(t).__name__}, not a tensor")
    if lengths is None and "lengths" in examples and examples["lengths"].dim() == 1:
        lengths = "lengths"  # the conventional name says so
    if lengths is not None and lengths not in examples:
        raise ExportError(f"lengths={lengths!r} is not one of the inputs {names}")
    dtypes = {n: torch.float32 if t.dtype in FLOATS else t.dtype for n, t in examples.items()}
    unknown = {n: d for n, d in dtypes.items() if d not in DTYPES}
    if unknown:
        raise ExportError(
            f"inputs {sorted(unknown)} have dtypes {sorted(map(str, unknown.values()))}; "
            f"export_model takes {sorted(map(str, DTYPES))} (floats are exported as float32)"
        )
    if lengths is not None and (dtypes[lengths] != torch.int64 or examples[lengths].dim() != 1):
        raise ExportError(f"the lengths input '{lengths}' must be int64 [batch]")
    ranges = {k: (int(v[0]), int(v[1])) for k, v in (input_ranges or {}).items()}
    for name, (low, high) in ranges.items():
        if name not in examples or low >= high:
            raise ExportError(f"input_ranges[{name!r}] must be (low, high) of one of {names}")
    for name, dtype in dtypes.items():
        if dtype in (torch.int64, torch.int32) and name != lengths and name not in ranges:
            raise ExportError(
                f"input '{name}' is {DTYPES[dtype]} without a declared range of values: declare "
                f"it, e.g. input_ranges={{'{name}': (0, vocabulary_size)}} "
                f"(lstm-deploy export: --example {name}=...:{DTYPES[dtype]}:0:VOCAB)"
            )
    axes: dict[str, dict[int, str]] = {}
    for name, t in examples.items():
        default = {0: BATCH} if name == lengths or t.dim() < 2 else {0: BATCH, 1: SEQUENCE}
        given = (dynamic_axes or {}).get(name)
        chosen = {int(k): str(v) for k, v in (given if given is not None else default).items()}
        bad = [a for a in chosen if not 0 <= a < t.dim()]
        if bad:
            raise ExportError(f"dynamic_axes[{name!r}] names axes {bad}; '{name}' has {t.dim()}")
        axes[name] = chosen
    if lengths is not None and axes[lengths] != {0: BATCH}:
        raise ExportError(f"the lengths input '{lengths}' must have axes {{0: 'batch'}}")
    shapes = {n: tuple(t.shape) for n, t in examples.items()}
    return Plan(names, dtypes, shapes, axes, lengths, ranges)


# -- the signature ---------------------------------------------------------------------------


def output_axes(
    flat: nn.Module, plan: Plan, n_outputs: int, output_axes: Mapping[int, Mapping[int, str]]
) -> list[tuple[int | str, ...]]:
    """Each output's shape: an axis that follows an input axis takes its name (two probes)."""
    with torch.no_grad():
        first = [t.shape for t in flat(*plan.inputs(plan.sizes(CAPTURE)))]
        second = [t.shape for t in flat(*plan.inputs(plan.sizes(PROBE), seed=1))]
    sizes = (plan.sizes(CAPTURE), plan.sizes(PROBE))
    shapes = []
    for k, (a, b) in enumerate(zip(first, second, strict=True)):
        dims: list[int | str] = []
        for i, (da, db) in enumerate(zip(a, b, strict=True)):
            named = output_axes.get(k, {}).get(i)
            found = [n for n in sizes[0] if sizes[0][n] == da and sizes[1][n] == db]
            if named is not None:
                dims.append(named)
            elif da == db:
                dims.append(da)
            elif found:
                dims.append(found[0])
            else:
                raise ExportError(
                    f"output {k}'s axis {i} is {da} at batch {sizes[0][BATCH]}, sequence "
                    f"{sizes[0][SEQUENCE]} and {db} at batch {sizes[1][BATCH]}, sequence "
                    f"{sizes[1][SEQUENCE]}: it follows no input axis; name it in dynamic_axes"
                )
        shapes.append(tuple(dims))
    return shapes


def torch_dtype_name(t: Tensor) -> str:
    if t.dtype not in DTYPES:
        raise ExportError(f"an output is {t.dtype}; export_model's outputs are {set(DTYPES)}")
    return DTYPES[t.dtype]


def state_specs(lstms: list[tuple[str, LSTM]], streamable: bool) -> list[StateSpec]:
    if not streamable:
        return []
    for path, m in lstms:
        if m.bidirectional:
            raise ExportError(
                f"cannot stream '{path}': it is bidirectional, and its reverse direction reads "
                "the whole sequence, so chunks cannot equal one run (streamable=False)"
            )
    return [StateSpec(f"{p}.h0", f"{p}.c0", f"{p}.hn", f"{p}.cn") for p, _ in lstms]


def state_names(state: list[StateSpec], side: str) -> list[str]:
    if side == "in":
        return [n for s in state for n in (s.h0, s.c0)]
    return [n for s in state for n in (s.hn, s.cn)]


def output_axes_by_index(
    dynamic_axes: Mapping[Any, Mapping[int, str]] | None, names: list[str]
) -> dict[int, dict[int, str]]:
    found = {}
    for key, axes in (dynamic_axes or {}).items():
        if isinstance(key, str) and key in names:
            found[names.index(key)] = {int(k): str(v) for k, v in axes.items()}
    return found


def other_axis_sizes(plan: Plan) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, axes in plan.axes.items():
        for i, axis in axes.items():
            if axis not in CAPTURE:
                sizes.setdefault(axis, plan.shapes[name][i])
    return sizes


def check_streamable(flat: Flat, plan: Plan, sig: Signature) -> None:
    """Refuse streamable=True unless two chunks, state carried, equal one run (float64)."""
    steps = 8
    sizes = {**plan.sizes(CAPTURE), SEQUENCE: steps}
    whole_in = plan.inputs(sizes, seed=2)
    n = len(whole_in)
    timed = [i for i, name in enumerate(plan.names) if SEQUENCE in plan.axes[name].values()]
    if not timed:
        raise ExportError("streamable=True needs an input with a 'sequence' axis")
    seq_axis = {i: next(a for a, v in plan.axes[plan.names[i]].items() if v == SEQUENCE)
                for i in timed}  # fmt: skip
    flat64 = copy.deepcopy(flat).double()
    as64 = [t.double() if t.is_floating_point() else t for t in whole_in]
    n_state = sum(1 for t in sig.inputs if t.name.endswith((".h0", ".c0")))
    n_user = n - n_state
    lengths = plan.lengths
    with torch.no_grad():
        whole = flat64(*as64)
        carried: list[Tensor] = list(as64[n_user:])
        chunks: list[tuple[Tensor, ...]] = []
        for start, stop in ((0, 3), (3, steps)):
            part = []
            for i, t in enumerate(as64[:n_user]):
                if i in timed:
                    t = t.narrow(seq_axis[i], start, stop - start)
                elif lengths is not None and plan.names[i] == lengths:
                    t = torch.full_like(t, stop - start)
                part.append(t)
            result = flat64(*part, *carried)
            chunks.append(result)
            carried = list(result[len(result) - len(carried) :])
    for k, spec in enumerate(sig.outputs[: len(sig.outputs) - n_state]):
        if SEQUENCE not in spec.shape:
            raise ExportError(
                f"cannot stream: output '{spec.name}' has no 'sequence' axis (a per-step head "
                "is what streams; streamable=False)"
            )
        axis = spec.shape.index(SEQUENCE)
        joined = torch.cat([c[k] for c in chunks], axis)
        worst = float((joined - whole[k]).abs().max())
        if worst > 1e-9:
            raise ExportError(
                f"cannot stream: output '{spec.name}' of two chunks with the state carried "
                f"differs from one run by {worst:.2g} (its head mixes time steps, or the model "
                "passes its own hx); streamable=False"
            )


def with_state(plan: Plan, state: Sequence[StateSpec], lstms: Sequence[tuple[str, LSTM]]) -> Plan:
    """The plan with each LSTM's state inputs (streamable models) after the model's own:
    float32 [batch, L * D, H_out] and [batch, L * D, hidden_size], batch first."""
    names, dtypes = list(plan.names), dict(plan.dtypes)
    shapes, axes = dict(plan.shapes), dict(plan.axes)
    for s, (_, m) in zip(state, lstms, strict=False):
        d = m.num_layers * (2 if m.bidirectional else 1)
        for name, size in ((s.h0, m.proj_size or m.hidden_size), (s.c0, m.hidden_size)):
            names.append(name)
            dtypes[name], shapes[name], axes[name] = torch.float32, (1, d, size), {0: BATCH}
    return dataclasses.replace(plan, names=names, dtypes=dtypes, shapes=shapes, axes=axes)


def signature(
    flat: Flat,
    plan: Plan,
    state: Sequence[StateSpec],
    output_names: Sequence[str] | None,
    dynamic_axes: Mapping[Any, Mapping[int, str]] | None,
) -> Signature:
    """The bundle's signature: `plan`'s inputs (with_state's), and the outputs of `flat` (the
    model behind it, eager) run at the capture sizes: dtypes, names (the state outputs last)
    and shapes whose axes are named after the input axes they follow (`output_axes`)."""
    inputs = tuple(
        TensorSpec(n, DTYPES[plan.dtypes[n]],
                   tuple(plan.axes[n].get(i, d) for i, d in enumerate(plan.shapes[n])))
        for n in plan.names
    )  # fmt: skip
    with _running(flat) as stack, torch.no_grad():
        try:
            results = flat(*plan.inputs(plan.sizes(CAPTURE)))
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(
                f"the model fails on its example inputs in {_where(flat, stack)}: {_why(e)}"
            ) from e
    n_model = len(results) - 2 * len(state)
    names = list(output_names or [f"output{i}" for i in range(n_model)])
    if len(names) != n_model:
        raise ExportError(
            f"output_names has {len(names)} names; the model returns {n_model} tensors"
        )
    names += state_names(list(state), "out")
    shapes = output_axes(flat, plan, len(results), output_axes_by_index(dynamic_axes, names))
    outputs = [TensorSpec(n, torch_dtype_name(t), s) for n, t, s in zip(names, results, shapes)]
    sig = Signature(inputs, tuple(outputs))
    Signature.from_json(sig.to_json())  # names unique, dtypes known
    return sig
