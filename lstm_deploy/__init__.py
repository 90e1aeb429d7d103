"""lstm_deploy: a from-scratch, TorchScript-scriptable LSTM with torch.nn.LSTM's interface.

The torch parts load on first use (PEP 562), so that the torch-free modules (`lstm_deploy.bundle`,
`lstm_deploy.config`, `lstm_deploy.versions`, `lstm_deploy.cli_common`) import without PyTorch:
a serving image reads bundles through them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lstm_deploy.config import LSTMConfig

if TYPE_CHECKING:
    from lstm_deploy._convert import ConversionError, convert
    from lstm_deploy.model import LSTM, lstm_cell, lstm_layer
    from lstm_deploy.seed import from_seed_tensors, last_valid_output, seed_init_
    from lstm_deploy.weights import (
        WeightsError,
        check_finite,
        config_from_state_dict,
        load_checkpoint,
        load_safetensors,
        save_safetensors,
    )

_LAZY = {
    "__version__": "lstm_deploy.versions",
    "LSTM": "lstm_deploy.model",
    "ConversionError": "lstm_deploy._convert",
    "convert": "lstm_deploy._convert",
    "lstm_cell": "lstm_deploy.model",
    "lstm_layer": "lstm_deploy.model",
    "from_seed_tensors": "lstm_deploy.seed",
    "last_valid_output": "lstm_deploy.seed",
    "seed_init_": "lstm_deploy.seed",
    "WeightsError": "lstm_deploy.weights",
    "check_finite": "lstm_deploy.weights",
    "config_from_state_dict": "lstm_deploy.weights",
    "load_checkpoint": "lstm_deploy.weights",
    "load_safetensors": "lstm_deploy.weights",
    "save_safetensors": "lstm_deploy.weights",
}

__all__ = [
    "LSTM",
    "ConversionError",
    "LSTMConfig",
    "WeightsError",
    "__version__",
    "check_finite",
    "config_from_state_dict",
    "convert",
    "from_seed_tensors",
    "last_valid_output",
    "load_checkpoint",
    "load_safetensors",
    "lstm_cell",
    "lstm_layer",
    "save_safetensors",
    "seed_init_",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'lstm_deploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
