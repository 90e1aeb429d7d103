"""torch.nn.LSTM's argument and input checks: the same exception types, raised in the same order.

The order matters where one call is wrong twice (an integer input with 2-D `hx` for a batched input
is nn.LSTM's RuntimeError, not its ValueError), so each check below notes where nn.LSTM makes it.
Each message names the argument, the expected and the actual; where nn.LSTM's message already
does, it is nn.LSTM's (PyTorch's module tests match some of them by pattern).
"""

import numbers
import warnings
from typing import Any, List, Optional, Tuple  # TorchScript resolves typing's generics

import torch
from torch import Tensor


def check_config(
    input_size: Any,
    hidden_size: Any,
    num_layers: Any,
    bias: Any,
    batch_first: Any,
    dropout: Any,
    proj_size: Any,
) -> None:
    """torch.nn.RNNBase.__init__'s checks in its order, its warning for dropout with one layer too.

    Stricter in one way: a bool is not taken for a size (nn.LSTM takes `input_size=True` as one
    feature, `num_layers=True` as one layer): True is a flag passed in the wrong place.
    """
    _check_dropout(dropout)
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
            f"expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={num_layers}",
            UserWarning,
            stacklevel=3,  # the caller of LSTM(...)
        )
    for name, flag in (("bias", bias), ("batch_first", batch_first)):
        # Not bool(flag): batch_first="False" would read every input batch-first.
        if not isinstance(flag, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(flag).__name__}")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        _check_int(name, value)
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero, got {value}")
    _check_int("num_layers", num_layers)
    if num_layers <= 0:
        raise ValueError(f"num_layers must be greater than zero, got {num_layers}")
    _check_int("proj_size", proj_size)
    if proj_size < 0:
        raise ValueError(
            "proj_size should be a positive integer or zero to disable projections, "
            f"got {proj_size}"
        )
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
            f"and hidden_size={hidden_size}"
        )


def _check_dropout(dropout: Any) -> None:
    message = (
        "dropout should be a number in range [0, 1] representing the probability of an element "
        f"being zeroed, got {dropout!r}"
    )
    try:
        # nn.LSTM's first step is float(dropout): TypeError for None or a complex number.
        value = float(dropout)
    except (TypeError, ValueError) as e:
        raise type(e)(message) from None
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= value <= 1:
        raise ValueError(message)


def _check_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")


def check_input(
    input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], input_size: int, weight: Tensor
) -> None:
    """nn.LSTM.forward's checks before it reads the state's shape, in its order.

    The input's rank (ValueError), the state's rank (RuntimeError), then nn.LSTM's check_input:
    dtype (ValueError, nn.LSTM's message; an integer input is a mismatch like any other) and size
    (RuntimeError); then its kernel's device check (RuntimeError).
    """
    if input.dim() not in (2, 3):
        raise ValueError(
            f"LSTM: expected input to be 2-D (L, H_in) or 3-D (L, N, H_in), got {input.dim()}-D "
            f"with shape {list(input.shape)}"
        )
    if hx is not None:
        rank = input.dim()
        if hx[0].dim() != rank or hx[1].dim() != rank:
            kind = "batched 3-D" if rank == 3 else "unbatched 2-D"
            raise RuntimeError(
                f"LSTM: for {kind} input, hx and cx should also be {rank}-D but got "
                f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
    if input.dtype != weight.dtype:
        actual, expected = dtype_name(input.dtype), dtype_name(weight.dtype)
        raise ValueError(
            f"RNN input dtype ({actual}) does not match weight dtype ({expected}). "
            f"Convert input: input.to({expected}), or convert model: model.to({actual})"
        )
    if input.size(-1) != input_size:
        raise RuntimeError(
            f"LSTM: input.size(-1) must be equal to input_size. Expected {input_size}, "
            f"got {input.size(-1)} (input shape {list(input.shape)})"
        )
    if input.device != weight.device:
        raise RuntimeError(
            f"LSTM: input is on {input.device} but the parameters are on {weight.device}; "
            "move one of them (input.to(device) or model.to(device))"
        )


def check_state(state: Tensor, name: str, expected: Tuple[int, int, int], x: Tensor) -> None:
    """nn.LSTM's check_hidden_size, then its kernel's dtype and device checks: all RuntimeError."""
    if state.dim() != 3 or (state.size(0), state.size(1), state.size(2)) != expected:
        raise RuntimeError(
            f"LSTM: expected {name} of shape {list(expected)}, got {list(state.shape)}"
        )
    if state.dtype != x.dtype:
        raise RuntimeError(
            f"LSTM: expected {name} of dtype {dtype_name(x.dtype)}, got {dtype_name(state.dtype)}"
        )
    if state.device != x.device:
        raise RuntimeError(f"LSTM: expected {name} on {x.device}, got it on {state.device}")


def check_steps(steps: int) -> None:
    """nn.LSTM's kernel refuses an empty sequence (an empty batch it takes)."""
    if steps == 0:
        raise RuntimeError("LSTM: expected sequence length to be larger than 0, got 0")


def check_lengths(lengths: Tensor, batch: int, steps: int) -> int:
    """Raises RuntimeError for bad lengths; returns the shortest (`steps` for an empty batch).

    As pack_padded_sequence: RuntimeError for a length below 1 (and for 0-D lengths); any integer
    dtype, taken as int64. What it lets through is refused here, as RuntimeError too, rather than
    run on a guess: a length above `steps` (it packs steps the input lacks, which unpacking then
    refuses), a float or bool dtype (it truncates), a missing length (it drops the sequence).
    """
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise RuntimeError(
            "LSTM: expected lengths of an integer dtype (torch.int64), "
            f"got {dtype_name(lengths.dtype)}"
        )
    if lengths.dim() != 1 or lengths.size(0) != batch:
        raise RuntimeError(
            f"LSTM: expected lengths of shape [{batch}] (one per sequence), "
            f"got {list(lengths.shape)}"
        )
    if batch > 0:
        lo = int(lengths.min())
        hi = int(lengths.max())
        if lo < 1 or hi > steps:
            raise RuntimeError(
                f"LSTM: every length must be in [1, {steps}] (the sequence length), got values "
                f"from {lo} to {hi}"
            )
        return lo
    return steps


def dtype_name(dtype: torch.dtype) -> str:
    """str(dtype), also in TorchScript, where a dtype formats as its enum's number ("6")."""
    if not torch.jit.is_scripting():
        return str(dtype)
    names: List[Tuple[torch.dtype, str]] = [
        (torch.float64, "torch.float64"),
        (torch.float32, "torch.float32"),
        (torch.float16, "torch.float16"),
        (torch.bfloat16, "torch.bfloat16"),
        (torch.int64, "torch.int64"),
        (torch.int32, "torch.int32"),
        (torch.int16, "torch.int16"),
        (torch.int8, "torch.int8"),
        (torch.uint8, "torch.uint8"),
        (torch.bool, "torch.bool"),
    ]
    for known, name in names:
        if dtype == known:
            return name
    return f"torch.dtype number {dtype}"
