"""Shared fixtures and the configuration table that the model and export tests parametrize over."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

# The suite's default exports leave model.pt2 out: each would be a C++ compile (tens of seconds).
# Subprocesses (the CLI, README's blocks) inherit it. `aoti_bundle` compiles one, once.
# (export/lstm_deploy_export/export/aoti.py's SKIP_ENV, spelled out: importing it here is slow.)
os.environ.setdefault("LSTM_DEPLOY_SKIP_PT2", "1")

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


@pytest.fixture(scope="session")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with model.onnx, exported once per session: what the servers serve in the tests."""
    from serving_support import export_onnx_bundle

    return export_onnx_bundle(tmp_path_factory.mktemp("serving") / "bundle")


@pytest.fixture(scope="module")
def reference(onnx_bundle: Path):
    """A direct ONNX Runtime run of onnx_bundle's model.onnx: the servers' oracle."""
    from serving_support import Reference

    return Reference(onnx_bundle)


# 2 layers, bidirectional, projected, no bias: every branch of model.pt2's graph but the bias add
# and the one-direction layer, in one compile (~30 s on 2 cores), shared by the tests that need it.
AOTI_MODEL = dict(input_size=5, hidden_size=8, num_layers=2, bidirectional=True, proj_size=3)


@pytest.fixture(scope="session")
def aoti_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with model.pt2 (and weights.safetensors), compiled once per session."""
    from lstm_deploy_export.export.writer import export_bundle

    from lstm_deploy import LSTM

    torch.manual_seed(0)
    model = LSTM(**AOTI_MODEL, bias=False)
    return export_bundle(model, tmp_path_factory.mktemp("aoti") / "bundle", artifacts="aoti").path
