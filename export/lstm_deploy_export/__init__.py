"""lstm_deploy_export: TorchScript and ONNX artifacts of lstm_deploy.LSTM, in a verifiable bundle.

Subpackages by job: `export` (graphs, exporters, the bundle writer, the Triton repository),
`check` (validate: the runtime registry, the sweep, comparison, the report), `bench`, `tools`
(C++ build, Triton server), `cli` (the `lstm-deploy` command). The bundle format itself is
`lstm_deploy.bundle`'s.

Attributes load lazily so that the `lstm-deploy` CLI starts without importing torch or onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Bundle", "BundleError", "export_bundle", "load_bundle", "validate"]

_LAZY = {
    "Bundle": "lstm_deploy.bundle",
    "BundleError": "lstm_deploy.bundle",
    "load_bundle": "lstm_deploy.bundle",
    "export_bundle": "lstm_deploy_export.export.writer",
    "validate": "lstm_deploy_export.check.validate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lstm_deploy_export' has no attribute {name!r}")
