"""Weights I/O: safetensors with the config in the metadata, and nn.LSTM checkpoints. No pickle.

A file that is not what its loader takes (an ONNX model, a TorchScript archive, a pickled module,
a GRU, a state_dict nested in a training checkpoint, NaN weights) is refused with one line that
says what it is and what to pass instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from lstm_deploy._formats import file_format, pickled_globals
from lstm_deploy.config import LSTMConfig
from lstm_deploy.model import LSTM

CONFIG_KEY = "lstm_deploy.config"
_NAME = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SAVE = "torch.save(model.state_dict(), path)"
_FROM_BUNDLE = (
    "an lstm-deploy bundle's {} is already exported; its weights.safetensors goes with --weights"
)

# What a file that is not a checkpoint (or not safetensors) is, and what to pass instead; keyed by
# its content (_formats.file_format), since an extension says only what the file was meant to be.
_FOREIGN = {
    "onnx": f"an ONNX model, not a checkpoint ({_FROM_BUNDLE.format('model.onnx')}); pass the "
    "torch.nn.LSTM's state_dict, saved with torch.save(lstm.state_dict(), path)",
    "torchscript": "a TorchScript archive (torch.jit.save), not a checkpoint "
    f"({_FROM_BUNDLE.format('model.pt')}); export from the module's state_dict instead: {_SAVE}",
    "torch.export": "a torch.export archive (torch.export.save), not a checkpoint; export from the "
    f"module's state_dict instead: {_SAVE}",
    "lstm-deploy safetensors": "a safetensors file written by lstm-deploy, not a PyTorch "
    "checkpoint: pass it with --weights (lstm_deploy.load_safetensors)",
    "safetensors": "a safetensors file, not a PyTorch checkpoint, and not one lstm-deploy wrote "
    f"(--weights takes those; this one has no '{CONFIG_KEY}' metadata): load it with "
    "safetensors.torch.load_file and torch.save the state_dict",
    "torch": "a PyTorch checkpoint (torch.save), not safetensors: pass it with --checkpoint "
    "(lstm_deploy.load_checkpoint)",
}
# Gate blocks in weight_ih_l0 per hidden unit, for the recurrent layers that share nn.LSTM's names.
_NOT_LSTM = {3: "a GRU", 1: "a vanilla RNN (torch.nn.RNN)"}


class WeightsError(ValueError):
    """A weights file or state_dict that is not what it should be; the message says why."""


def save_safetensors(model: LSTM, path: str | Path) -> None:
    """Write the model's weights and config (in the file's metadata) as safetensors.

    Written with open(), so the file's mode follows the umask like the bundle's other files
    (safetensors' own save_file creates it 0600)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    Path(path).write_bytes(save(tensors, metadata={CONFIG_KEY: json.dumps(model.config.to_dict())}))


def load_safetensors(path: str | Path, **factory: object) -> LSTM:
    """An LSTM from a safetensors file written by `save_safetensors`; NaN or Inf weights refused."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        kind = file_format(path, CONFIG_KEY)
        if kind in ("onnx", "torchscript", "torch.export", "torch"):
            raise WeightsError(f"{path}: {_FOREIGN[kind]}") from None
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
    check_finite(model, where=str(path))
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
        hint = _submodule_hint(state_dict)
        raise WeightsError(
            f"not an LSTM state_dict: {hint}"
            if hint
            else f"not an LSTM state_dict: unexpected keys {bad[:5]}; expected torch.nn.LSTM "
            "names such as weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0"
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"not an LSTM state_dict: {not_tensors[:5]} are not tensors")
    if "weight_ih_l0" not in state_dict or "weight_hh_l0" not in state_dict:
        raise WeightsError("not an LSTM state_dict: weight_ih_l0 and weight_hh_l0 are required")
    w_ih, w_hh = state_dict["weight_ih_l0"], state_dict["weight_hh_l0"]
    w_hr = state_dict.get("weight_hr_l0")
    if w_ih.dim() != 2 or w_hh.dim() != 2 or (w_hr is not None and w_hr.dim() != 2):
        raise WeightsError(
            f"weight_ih_l0 and weight_hh_l0 have shapes {list(w_ih.shape)} and "
            f"{list(w_hh.shape)}; an LSTM's are [4 * hidden_size, input_size] and "
            "[4 * hidden_size, hidden_size]"
        )
    _refuse_other_rnns(w_ih, w_hh, has_projection=w_hr is not None)
    if w_ih.size(0) % 4 != 0:
        raise WeightsError(
            f"weight_ih_l0 has shape {list(w_ih.shape)}; an LSTM's is [4 * hidden_size, input_size]"
        )
    hidden = w_ih.size(0) // 4
    layers = 1 + max(int(_NAME.match(k).group(2)) for k in state_dict)  # type: ignore[union-attr]
    proj = w_hr.size(0) if w_hr is not None else 0
    if list(w_hh.shape) != [4 * hidden, proj or hidden]:
        columns = "proj_size" if proj else "hidden_size"
        raise WeightsError(
            f"weight_hh_l0 has shape {list(w_hh.shape)}, inconsistent with weight_ih_l0's "
            f"{list(w_ih.shape)}: an LSTM's is [4 * hidden_size, {columns}] = "
            f"{[4 * hidden, proj or hidden]}"
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
    refused, never executed. A dict with a "state_dict" entry that is an LSTM state_dict is
    unwrapped; any other nesting is refused with the way to save the inner dict. NaN or Inf
    weights are refused (`check_finite`).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    kind = file_format(path, CONFIG_KEY)
    if kind is not None and kind != "torch":
        raise WeightsError(f"{path}: {_FOREIGN[kind]}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... by case
        raise _unloadable(path, e) from None
    state_dict = _state_dict_in(obj, str(path))
    try:
        config = config_from_state_dict(state_dict, batch_first=batch_first, dropout=dropout)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    model = LSTM.from_config(config)
    _load(model, state_dict, str(path))
    check_finite(model, where=str(path))
    return model


def check_finite(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], where: str = ""
) -> None:
    """Raise WeightsError naming the first parameter that holds NaN or Inf, and how many.

    One non-finite weight turns every output it reaches into NaN, so no artifact made from it is
    worth shipping; `where` (a path) prefixes the message.
    """
    tensors = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, torch.nn.Module)
        else model_or_state_dict
    )
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        if bool(torch.isfinite(t).all()):
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        counts = " and ".join(f"{n} {label}" for n, label in ((nan, "NaN"), (inf, "Inf")) if n)
        raise WeightsError(
            f"{where + ': ' if where else ''}{name} has {counts} (of {t.numel()} values); the "
            "model would output NaN: use weights saved before training diverged"
        )


def _refuse_other_rnns(w_ih: torch.Tensor, w_hh: torch.Tensor, has_projection: bool) -> None:
    # nn.GRU and nn.RNN use nn.LSTM's parameter names; only the gate count (4 for an LSTM) in
    # weight_ih_l0's rows per hidden unit (weight_hh_l0's columns) tells them apart.
    hidden = w_hh.size(1)
    if has_projection or hidden == 0 or w_hh.size(0) != w_ih.size(0) or w_ih.size(0) % hidden:
        return
    blocks = w_ih.size(0) // hidden
    kind = _NOT_LSTM.get(blocks)
    if kind is not None:
        raise WeightsError(
            f"this is {kind} state_dict, not an LSTM: weight_ih_l0 has shape {list(w_ih.shape)}, "
            f"{blocks} gate block{'s' * (blocks > 1)} of hidden_size {hidden} where an LSTM has 4; "
            "lstm-deploy exports torch.nn.LSTM only (torch.onnx.export takes the module as is)"
        )


def _submodule_hint(state_dict: Mapping[str, object]) -> str | None:
    """For a whole model's state_dict: which key prefix holds the LSTM, and how to save just it."""
    prefixes = sorted({k[: -len("weight_ih_l0")] for k in map(str, state_dict)
                       if k.endswith(".weight_ih_l0")})  # fmt: skip
    if not prefixes:
        return None
    prefix = prefixes[0]
    inner = {k[len(prefix) :]: v for k, v in state_dict.items() if str(k).startswith(prefix)}
    try:
        config_from_state_dict(inner)  # type: ignore[arg-type]
    except WeightsError as e:
        return f"a whole model's state_dict; under its prefix '{prefix}': {e}"
    where = f"the prefix '{prefix}'" if len(prefixes) == 1 else f"the prefixes {prefixes}"
    # "encoder.layers.0." is the attribute path model.encoder.layers[0].
    attr = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", prefix.rstrip("."))
    return (
        f"a whole model's state_dict, with the LSTM's weights under {where}; save just the "
        f"LSTM's state_dict: torch.save(model.{attr}.state_dict(), path)"
    )


def _state_dict_in(obj: object, where: str) -> Mapping[str, torch.Tensor]:
    """The state_dict in what torch.load returned, or an error naming the key it is nested under."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{where}: holds a {type(obj).__name__}, not an LSTM state_dict")
    if all(_NAME.match(str(k)) for k in obj):
        return obj
    nested = [k for k, v in obj.items() if isinstance(v, Mapping) and v
              and any(isinstance(t, torch.Tensor) for t in v.values())]  # fmt: skip
    if not nested:
        return obj  # config_from_state_dict names the unexpected keys
    rnns = [k for k in nested if any(str(n).endswith("weight_ih_l0") for n in obj[k])]
    key = (rnns or nested)[0]
    try:
        config_from_state_dict(obj[key])
    except WeightsError as e:
        raise WeightsError(f"{where}: under the key {key!r}: {e}") from None
    if key == "state_dict":
        return obj[key]  # what training scripts commonly save; unambiguous, so unwrapped
    others = [k for k in obj if k != key][:4]
    raise WeightsError(
        f"{where}: the LSTM state_dict is nested under the key {key!r} (next to {others}); "
        f"save the inner dict alone: torch.save(checkpoint[{key!r}], path)"
    )


def _unloadable(path: Path, e: Exception) -> WeightsError:
    """Why torch.load(weights_only=True) refused the file, without torch's advice to load unsafely.

    torch's message runs over several lines, with terminal colour codes, and suggests
    weights_only=False: the file's own pickle opcodes say better what it holds.
    """
    if path.stat().st_size == 0:
        return WeightsError(f"{path}: an empty file, not a checkpoint")
    names, is_module = pickled_globals(path)
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # torch's allowlist reads zip checkpoints only; the legacy format's helpers:
        unsafe = {n for n in names if not n.startswith(("torch._utils.", "collections."))
                  and not n.endswith("Storage")}  # fmt: skip
    names = list(dict.fromkeys(n for n in names if n in unsafe))
    if names and is_module:
        return WeightsError(
            f"{path}: a pickled module ({names[0]}), not a state_dict; lstm-deploy does not "
            f"unpickle objects, which can run code. Save its weights alone: {_SAVE}"
        )
    if names:
        return WeightsError(
            f"{path}: holds Python objects ({', '.join(names[:5])}) besides tensors, which "
            "torch.load(weights_only=True) refuses to unpickle (nothing in the file ran); "
            f"save tensors only: {_SAVE}"
        )
    with path.open("rb") as f:
        head = f.read(2)
    if head[:2] != b"PK" and head[0] != 0x80:
        reason = "neither torch.save's zip format nor a pickle"
    else:  # torch's first sentence, without its colour codes or its advice to load unsafely
        text = _ANSI.sub("", str(e)).split("WeightsUnpickler error:")[-1]
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        first = first.split(". ")[0].rstrip(".")
        reason = type(e).__name__ if not first or "weights_only" in first else first
    return WeightsError(
        f"{path}: not a checkpoint that torch.load can read ({reason}); expected a torch.nn.LSTM "
        "state_dict saved with torch.save(lstm.state_dict(), path)"
    )


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
