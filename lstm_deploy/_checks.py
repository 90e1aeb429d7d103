"""torch.nn.LSTM's argument and input checks; each message names the expected and the actual."""

from typing import Tuple  # TorchScript resolves typing's generics

import torch
from torch import Tensor


def check_config(
    input_size: int, hidden_size: int, num_layers: int, dropout: float, proj_size: int
) -> None:
    # The same checks and messages as torch.nn.RNNBase.
    if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1) or isinstance(dropout, bool):
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            f"element being zeroed, got {dropout!r}"
        )
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero, got {value}")
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError(
            "proj_size should be a positive integer or zero to disable projections, "
            f"got {proj_size!r}"
        )
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
            f"and hidden_size={hidden_size}"
        )


def check_input(input: Tensor, input_size: int, weight: Tensor) -> None:
    if input.dim() not in (2, 3):
        raise ValueError(
            f"LSTM: expected input to be 2-D (L, H_in) or 3-D (L, N, H_in), got {input.dim()}-D "
            f"with shape {list(input.shape)}"
        )
    if not input.is_floating_point():
        raise TypeError(f"LSTM: expected a floating-point input, got dtype {input.dtype}")
    if input.size(-1) != input_size:
        raise RuntimeError(
            f"LSTM: input.size(-1) must be equal to input_size. Expected {input_size}, "
            f"got {input.size(-1)} (input shape {list(input.shape)})"
        )
    if input.dtype != weight.dtype:
        raise TypeError(
            f"LSTM: input dtype {input.dtype} does not match the parameters' dtype {weight.dtype}; "
            "convert one of them (e.g. input.to(dtype) or model.to(dtype))"
        )
    if input.device != weight.device:
        raise RuntimeError(
            f"LSTM: input is on {input.device} but the parameters are on {weight.device}; "
            "move one of them (input.to(device) or model.to(device))"
        )


def check_unbatched_state(h0: Tensor, c0: Tensor) -> None:
    if h0.dim() != 2 or c0.dim() != 2:
        raise RuntimeError(
            f"LSTM: for unbatched 2-D input, hx and cx should also be 2-D but got "
            f"({h0.dim()}-D, {c0.dim()}-D) tensors"
        )


def check_state(state: Tensor, name: str, expected: Tuple[int, int, int], x: Tensor) -> None:
    if state.dim() != 3 or (state.size(0), state.size(1), state.size(2)) != expected:
        raise RuntimeError(
            f"LSTM: expected {name} of shape {list(expected)}, got {list(state.shape)}"
        )
    if state.dtype != x.dtype:
        raise TypeError(f"LSTM: expected {name} of dtype {x.dtype}, got {state.dtype}")
    if state.device != x.device:
        raise RuntimeError(f"LSTM: expected {name} on {x.device}, got it on {state.device}")


def check_lengths(lengths: Tensor, batch: int, steps: int) -> int:
    """Raises for bad lengths; returns the shortest (`steps` for an empty batch)."""
    if lengths.dtype != torch.int64:
        raise TypeError(f"LSTM: expected lengths of dtype torch.int64, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.size(0) != batch:
        raise RuntimeError(
            f"LSTM: expected lengths of shape [{batch}] (one per sequence), "
            f"got {list(lengths.shape)}"
        )
    if batch > 0:
        lo = int(lengths.min())
        hi = int(lengths.max())
        if lo < 1 or hi > steps:
            raise ValueError(
                f"LSTM: every length must be in [1, {steps}] (the sequence length), got values "
                f"from {lo} to {hi}"
            )
        return lo
    return steps
