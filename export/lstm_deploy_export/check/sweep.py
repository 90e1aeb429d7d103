"""The parity sweep: the cases `lstm-deploy validate` runs, and their inputs.

An LSTM bundle's inputs are the deployed signature's (`make_inputs`); a whole model's are built
from its own signature (`model_inputs`): floats N(0, 1), integer inputs (token ids) uniform in
their declared range, the lengths input (where it declares one) per the case's pattern, each
LSTM's state (where it is streamable) per the case's, other named axes at the manifest's sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_deploy.bundle import BATCH, C0, H0, INPUT, LENGTHS, SEQUENCE, BundleError, ModelInfo
from lstm_deploy.config import LSTMConfig

Arrays = dict[str, np.ndarray]

# (batch, steps, lengths, state). Batch 1, odd and >= 64; steps 1, short and >= 1024, each
# extreme with a moderate other (B=64 x T=1024 per seed would double the thorough sweep's time;
# a sequence's arithmetic does not depend on the batch it is in). Lengths: "full" all T,
# "equal" all ceil(T/2), "random" uniform in [1, T], "one-long" one T and the rest in [1, T/16].
# State: "zeros", or "random": h0 = tanh(N(0, 1)), c0 ~ N(0, 1).
QUICK_SWEEP = (
    (1, 1, "full", "zeros"),
    (7, 9, "random", "random"),
    (64, 9, "equal", "zeros"),
    (9, 1024, "one-long", "random"),
)
THOROUGH_SWEEP = (
    *QUICK_SWEEP,
    (5, 1, "full", "random"),
    (1, 1024, "full", "random"),
    (3, 1024, "random", "zeros"),
    (64, 300, "random", "random"),
    (13, 300, "one-long", "zeros"),
)
QUICK_SEEDS, THOROUGH_SEEDS = (0,), (0, 1, 2)
INPUT_SCALE = 1.0  # input ~ N(0, INPUT_SCALE^2): standardised features


@dataclass(frozen=True)
class Case:
    id: int
    seed: int
    batch: int
    steps: int
    lengths: str
    state: str

    def label(self) -> str:
        return (
            f"case {self.id}: B={self.batch} T={self.steps} lengths={self.lengths} "
            f"state={self.state} seed={self.seed}"
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sweep(
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    lengths: bool = True,
    state: bool = True,
) -> list[Case]:
    """The cases: each (batch, steps, lengths, state) of the sweep for each seed.

    lengths, state: whether the model takes them (a whole model may take neither); without,
    every case's sequences are whole ("full") and no state is given ("zeros").
    """
    table = QUICK_SWEEP if quick else THOROUGH_SWEEP
    seeds = list(seeds if seeds is not None else (QUICK_SEEDS if quick else THOROUGH_SEEDS))
    cases = [
        (seed, b, t, pattern if lengths else "full", start if state else "zeros")
        for seed in seeds
        for b, t, pattern, start in table
    ]
    return [Case(i, *c) for i, c in enumerate(cases)]


def _rng(case: Case) -> np.random.Generator:
    """The case's generator: its inputs are a function of (seed, batch, steps, lengths, state)."""
    return np.random.default_rng(
        [case.seed, case.batch, case.steps, *map(ord, case.lengths + case.state)]
    )


def _lengths(case: Case, rng: np.random.Generator) -> np.ndarray:
    b, t = case.batch, case.steps
    if case.lengths == "full":
        lengths = np.full(b, t)
    elif case.lengths == "equal":
        lengths = np.full(b, (t + 1) // 2)
    elif case.lengths == "random":
        lengths = rng.integers(1, t + 1, b)
    elif case.lengths == "one-long":
        lengths = rng.integers(1, max(1, t // 16) + 1, b)
        lengths[rng.integers(b)] = t
    else:
        raise ValueError(f"unknown lengths pattern {case.lengths!r}")
    return lengths.astype(np.int64)


def _state(case: Case, rng: np.random.Generator, shape: tuple[int, ...], h: bool) -> np.ndarray:
    """An initial h (tanh(N(0, 1)): an LSTM's h is in (-1, 1)) or c (N(0, 1)), or zeros."""
    if case.state == "zeros":
        return np.zeros(shape, np.float32)
    x = rng.standard_normal(shape)
    return (np.tanh(x) if h else x).astype(np.float32)


def make_inputs(case: Case, config: LSTMConfig) -> Arrays:
    """An LSTM bundle's four inputs, a function of (case.seed, batch, steps, lengths, state)."""
    rng = _rng(case)
    b, t = case.batch, case.steps
    states = config.num_layers * config.num_directions
    x = INPUT_SCALE * rng.standard_normal((b, t, config.input_size))
    lengths = _lengths(case, rng)
    h0 = _state(case, rng, (b, states, config.real_hidden_size), h=True)
    c0 = _state(case, rng, (b, states, config.hidden_size), h=False)
    return {INPUT: x.astype(np.float32), LENGTHS: lengths, H0: h0, C0: c0}


def model_inputs(case: Case, info: ModelInfo, axes: Mapping[str, int]) -> Arrays:
    """A whole model's inputs, by its signature, a function of the case alone.

    axes: the sizes of named axes other than batch and sequence (the manifest's model.axes).
    """
    rng = _rng(case)
    sizes = {**axes, BATCH: case.batch, SEQUENCE: case.steps}
    h0s = {s.h0 for s in info.state}
    c0s = {s.c0 for s in info.state}
    found: Arrays = {}
    for spec in info.signature.inputs:
        missing = [d for d in spec.shape if isinstance(d, str) and d not in sizes]
        if missing:
            raise BundleError(
                f"input {spec.name!r} has the axis {missing[0]!r}, whose size the manifest's "
                "model.axes does not give; re-export the bundle"
            )
        shape = spec.concrete(sizes)
        if spec.name == info.lengths:
            value = _lengths(case, rng)
        elif spec.name in h0s or spec.name in c0s:
            value = _state(case, rng, shape, h=spec.name in h0s)
        elif spec.name in info.ranges:
            low, high = info.ranges[spec.name]
            value = rng.integers(low, high, shape)
        elif spec.dtype == "bool":
            value = rng.integers(0, 2, shape).astype(bool)
        elif spec.dtype.startswith("float"):
            value = INPUT_SCALE * rng.standard_normal(shape)
        else:
            raise BundleError(
                f"input {spec.name!r} is {spec.dtype} without a range of values in the manifest "
                "(model.ranges); re-export it with input_ranges"
            )
        found[spec.name] = np.asarray(value).astype(spec.dtype)
    return found


def padding_mask(lengths: np.ndarray, steps: int) -> np.ndarray:
    """(B, T) bool: True at padded steps, t >= length."""
    return np.arange(steps)[None, :] >= lengths[:, None]
