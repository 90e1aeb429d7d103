"""The parity sweep: the cases `lstm-deploy validate` runs, and their inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_deploy.bundle import C0, H0, INPUT, LENGTHS
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


def sweep(quick: bool = False, seeds: Sequence[int] | None = None) -> list[Case]:
    """The cases: each (batch, steps, lengths, state) of the sweep for each seed."""
    table = QUICK_SWEEP if quick else THOROUGH_SWEEP
    seeds = list(seeds if seeds is not None else (QUICK_SEEDS if quick else THOROUGH_SEEDS))
    cases = [(seed, *spec) for seed in seeds for spec in table]
    return [Case(i, *c) for i, c in enumerate(cases)]


def make_inputs(case: Case, config: LSTMConfig) -> Arrays:
    """The case's four inputs, a function of (case.seed, batch, steps, lengths, state) alone."""
    key = [case.seed, case.batch, case.steps, *map(ord, case.lengths + case.state)]
    rng = np.random.default_rng(key)
    b, t = case.batch, case.steps
    states = config.num_layers * config.num_directions
    x = INPUT_SCALE * rng.standard_normal((b, t, config.input_size))
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
    h_shape = (b, states, config.real_hidden_size)
    c_shape = (b, states, config.hidden_size)
    if case.state == "random":
        h0, c0 = np.tanh(rng.standard_normal(h_shape)), rng.standard_normal(c_shape)
    else:
        h0, c0 = np.zeros(h_shape), np.zeros(c_shape)
    return {
        INPUT: x.astype(np.float32),
        LENGTHS: lengths.astype(np.int64),
        H0: h0.astype(np.float32),
        C0: c0.astype(np.float32),
    }


def padding_mask(lengths: np.ndarray, steps: int) -> np.ndarray:
    """(B, T) bool: True at padded steps, t >= length."""
    return np.arange(steps)[None, :] >= lengths[:, None]
