"""lstm_deploy_export: TorchScript and ONNX artifacts of lstm_deploy.LSTM, in a verifiable bundle.

Attributes load lazily so that the `lstm-deploy` CLI starts without importing torch or onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Bundle", "BundleError", "export_bundle", "load_bundle", "signature"]

_LAZY = {
    "Bundle": "lstm_deploy_export.bundle",
    "BundleError": "lstm_deploy_export.bundle",
    "export_bundle": "lstm_deploy_export.bundle",
    "load_bundle": "lstm_deploy_export.bundle",
    "signature": "lstm_deploy_export.signature",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lstm_deploy_export' has no attribute {name!r}")
