"""lstm_deploy: a from-scratch, TorchScript-scriptable LSTM with torch.nn.LSTM's interface."""

from lstm_deploy.model import LSTM, LSTMConfig, lstm_cell, lstm_layer
from lstm_deploy.seed import from_seed_tensors, last_valid_output, seed_init_
from lstm_deploy.weights import (
    WeightsError,
    config_from_state_dict,
    load_checkpoint,
    load_safetensors,
    save_safetensors,
)

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "LSTMConfig",
    "WeightsError",
    "__version__",
    "config_from_state_dict",
    "from_seed_tensors",
    "last_valid_output",
    "load_checkpoint",
    "load_safetensors",
    "lstm_cell",
    "lstm_layer",
    "save_safetensors",
    "seed_init_",
]
