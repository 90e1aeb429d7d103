"""Shared fixtures and the configuration table that the model and export tests parametrize over."""

from __future__ import annotations

import itertools

import pytest
import torch

# num_layers x bidirectional x proj_size x bias x batch_first: every combination.
MODEL_CONFIGS = [
    dict(num_layers=n, bidirectional=bi, proj_size=proj, bias=bias, batch_first=bf)
    for n, bi, proj, bias, bf in itertools.product(
        (1, 2, 3), (False, True), (0, 3), (True, False), (False, True)
    )
]


def config_id(c: dict) -> str:
    return "-".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.items())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
