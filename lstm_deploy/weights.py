"""Weights I/O: safetensors with the config in the metadata, and nn.LSTM checkpoints. No pickle."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lstm_deploy.config import LSTMConfig
from lstm_deploy.model import LSTM

CONFIG_KEY = "lstm_deploy.config"
_NAME = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")


class WeightsError(ValueError):
    """A weights file or state_dict that is not what it should be; the message says why."""


def save_safetensors(model: LSTM, path: str | Path) -> None:
    """Write the model's weights and config (in the file's metadata) as safetensors."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={CONFIG_KEY: json.dumps(model.config.to_dict())})


def load_safetensors(path: str | Path, **factory: object) -> LSTM:
    """An LSTM from a safetensors file written by `save_safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if CONFIG_KEY not in metadata:
        raise WeightsError(
            f"{path}: no '{CONFIG_KEY}' in the safetensors metadata; it was not written by "
            "lstm_deploy.save_safetensors (for a plain state_dict, use a checkpoint and "
            "config_from_state_dict)"
        )
    config = LSTMConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    model = LSTM.from_config(config, **factory)
    _load(model, tensors, str(path))
    return model


def config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], batch_first: bool = False, dropout: float = 0.0
) -> LSTMConfig:
    """The LSTM configuration that a torch.nn.LSTM state_dict implies.

    Shapes tell input_size, hidden_size, num_layers, bias, bidirectional and proj_size; they cannot
    tell batch_first or dropout, which the caller confirms.
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise WeightsError("expected a non-empty state_dict (a mapping of names to tensors)")
    bad = [k for k, v in state_dict.items() if not _NAME.match(str(k))]
    if bad:
        raise WeightsError(
            f"not an LSTM state_dict: unexpected keys {bad[:5]}; expected torch.nn.LSTM names "
            "such as weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0"
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"not an LSTM state_dict: {not_tensors[:5]} are not tensors")
    if "weight_ih_l0" not in state_dict or "weight_hh_l0" not in state_dict:
        raise WeightsError("not an LSTM state_dict: weight_ih_l0 and weight_hh_l0 are required")
    w_ih, w_hh = state_dict["weight_ih_l0"], state_dict["weight_hh_l0"]
    if w_ih.dim() != 2 or w_ih.size(0) % 4 != 0:
        raise WeightsError(
            f"weight_ih_l0 has shape {list(w_ih.shape)}; an LSTM's is [4 * hidden_size, input_size]"
        )
    hidden = w_ih.size(0) // 4
    layers = 1 + max(int(_NAME.match(k).group(2)) for k in state_dict)  # type: ignore[union-attr]
    proj = state_dict["weight_hr_l0"].size(0) if "weight_hr_l0" in state_dict else 0
    if w_hh.dim() != 2 or w_hh.size(1) != (proj or hidden):
        raise WeightsError(
            f"weight_hh_l0 has shape {list(w_hh.shape)}, inconsistent with weight_ih_l0"
        )
    return LSTMConfig(
        input_size=w_ih.size(1),
        hidden_size=hidden,
        num_layers=layers,
        bias="bias_ih_l0" in state_dict,
        batch_first=batch_first,
        dropout=dropout,
        bidirectional="weight_ih_l0_reverse" in state_dict,
        proj_size=proj,
    )


def load_checkpoint(path: str | Path, batch_first: bool = False, dropout: float = 0.0) -> LSTM:
    """An LSTM from a PyTorch checkpoint holding a torch.nn.LSTM state_dict.

    Loaded with `torch.load(weights_only=True)`: a file that holds arbitrary Python objects is
    refused, never executed. A dict with a "state_dict" entry is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... by case
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{path}: cannot be loaded safely with torch.load(weights_only=True): {first}"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not an LSTM state_dict")
    config = config_from_state_dict(obj, batch_first=batch_first, dropout=dropout)
    model = LSTM.from_config(config)
    _load(model, obj, str(path))
    return model


def _load(model: LSTM, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{where}: {name} has shape {list(t.shape)}, expected {list(expected[name].shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
