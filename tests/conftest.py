"""Shared fixtures and the configuration table that the model and export tests parametrize over."""

from __future__ import annotations

import itertools
from pathlib import Path

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
