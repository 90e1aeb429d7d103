"""The graphs of a whole model: its LSTMs replaced by Taps, captured, written.

A `Tap` takes an LSTM's place in a copy of the user's module and runs the deployed form of the
artifact being written (`DeployLSTM` for model.pt, `NativeOnnxLSTM` for model.onnx,
`ScanOnnxLSTM` for model.scan.onnx), with the LSTM's interface: input, hx, lengths; batch first
or not; unbatched. `Flat` puts the module behind the bundle's signature: inputs positional,
outputs one flat tuple, and, for a streamable model, each Tap's initial state as inputs after the
model's own and its final state as outputs after the model's own.

Where a capture fails, torch.export runs the module as Python under hooks that keep the stack of
running submodules, so that the error names the user's submodule (`_diagnose`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from lstm_deploy._convert import replace_modules
from lstm_deploy._ready import make_ready
from lstm_deploy.bundle import Signature
from lstm_deploy.model import LSTM
from lstm_deploy_export.export.exporters import OPSET, _quiet_exporter, save_onnx
from lstm_deploy_export.export.graphs import DeployLSTM, ExportError, NativeOnnxLSTM, ScanOnnxLSTM

__all__ = ["Flat", "Tap", "flatten", "tapped", "write_onnx", "write_torchscript"]


# -- the Tap ---------------------------------------------------------------------------------


class Tap(nn.Module):
    """An LSTM's place in a user's module, run by `graph` (DeployLSTM or an ONNX graph module).

    `graph` takes the deployed signature (batch-first input, lengths, h0, c0) and returns
    (output, hn, cn) batch first; the Tap adapts the module's call to it. `state` is a list that
    `Flat` shares among its Taps: the k-th Tap's initial (h0, c0), where given, replaces a missing
    hx, and its call appends its (hn, cn), batch first. (A list, not tensor attributes: the
    exporters trace its mutation as Python, as they trace the rest of the model.)
    """

    def __init__(self, lstm: LSTM, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph
        self.batch_first = lstm.batch_first
        self.states = lstm.num_layers * (2 if lstm.bidirectional else 1)
        self.h_out = lstm.proj_size if lstm.proj_size > 0 else lstm.hidden_size
        self.hidden_size = lstm.hidden_size
        self.index = 0  # this Tap's place in `state`
        self.state: list[Any] = []  # Flat's: [(h0, c0) per Tap, or nothing] + [(hn, cn) so far]

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(0)
        else:
            x = input if self.batch_first else input.transpose(0, 1)  # (B, T, I)
        if hx is not None:
            h0, c0 = (s.transpose(0, 1) if batched else s.unsqueeze(0) for s in hx)
        elif self.state and self.state[0] is not None:
            h0, c0 = self.state[0][self.index]
        else:  # zeros of the batch's size, without a Python int (the size stays symbolic)
            zero = x[:, :1, :1].mul(0).expand(-1, self.states, 1)
            h0 = zero.expand(-1, -1, self.h_out).contiguous()
            c0 = zero.expand(-1, -1, self.hidden_size).contiguous()
        if lengths is None:  # every sequence whole: T, as a tensor of the batch's size
            lengths = torch.ones_like(x[:, :, 0], dtype=torch.int64).sum(1)
        output, hn, cn = self.graph(x, lengths.to(torch.int64), h0, c0)
        if self.state:
            self.state.append((hn, cn))
        if not batched:
            return output.squeeze(0), (hn.squeeze(0), cn.squeeze(0))
        if not self.batch_first:
            output = output.transpose(0, 1)
        return output, (hn.transpose(0, 1), cn.transpose(0, 1))


def tapped(model: nn.Module, make: Callable[[LSTM], nn.Module]) -> tuple[nn.Module, list[Tap]]:
    """A copy of `model` with each LSTM replaced by a Tap around `make(lstm)`, and the Taps."""
    model = copy.deepcopy(model).requires_grad_(False)  # inference graphs: no autograd traced
    # An LSTM registered under several names gets one Tap, in each of its places.
    model, taps = replace_modules(model, LSTM, lambda lstm: Tap(lstm, make(lstm)))
    return model, cast(list[Tap], list(taps.values()))


class Flat(nn.Module):
    """The model behind the bundle's signature: inputs positional, outputs one flat tuple, and
    (streamable) each Tap's state as inputs after the model's own and outputs after its own."""

    def __init__(self, model: nn.Module, taps: Sequence[Tap], n_inputs: int, stateful: bool):
        super().__init__()
        self.model, self.taps, self.n_inputs, self.stateful = model, list(taps), n_inputs, stateful
        self.state: list[Any] = []
        for k, tap in enumerate(self.taps):
            tap.index, tap.state = k, self.state

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        inputs, states = args[: self.n_inputs], args[self.n_inputs :]
        self.state.clear()
        if self.stateful:
            self.state.append([(states[2 * k], states[2 * k + 1]) for k in range(len(self.taps))])
        else:
            self.state.append(None)
        outputs = flatten(self.model(*inputs))
        if self.stateful:
            final = self.state[1:]
            if len(final) != len(self.taps):
                raise ExportError(
                    f"a streamable model must call each of its {len(self.taps)} LSTMs once per "
                    f"forward; this one made {len(final)} calls"
                )
            outputs += [t for pair in final for t in pair]
        return tuple(outputs)


def flatten(result: Any) -> list[Tensor]:
    """A module's result as a flat list of tensors, tuples and lists depth first."""
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, tuple | list):
        return [t for item in result for t in flatten(item)]
    raise ExportError(
        f"the model returned a {type(result).__name__}; export_model takes modules that return "
        "tensors, or tuples and lists of them (return a tuple instead of a dict or a dataclass)"
    )


def _lstms(model: nn.Module) -> list[tuple[str, LSTM]]:
    return [(path or "<model>", m) for path, m in model.named_modules() if isinstance(m, LSTM)]


@contextlib.contextmanager
def _running(model: nn.Module) -> Iterator[list[str]]:
    """The stack of submodules running (qualified names), kept by hooks while the block runs."""
    stack: list[str] = []
    handles = []
    for path, m in model.named_modules():
        if not path or isinstance(m, torch.jit.ScriptModule):
            continue
        handles.append(m.register_forward_pre_hook(lambda *_, p=path: stack.append(p)))
        handles.append(m.register_forward_hook(lambda *_, p=path: stack.pop() and None))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _why(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    if "data-dependent" in text or "GuardOnDataDependent" in text:
        return (
            "data-dependent Python control flow (an `if`, a loop or a Python number taken from "
            "a tensor's values) cannot be exported: compute it with tensor ops (torch.where, "
            "masks) instead"
        )
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:600]


def _where(flat: Flat, stack: list[str]) -> str:
    """The user's submodule that was running: its path in their model, and its class."""
    path = stack[-1] if stack else "model"
    path = path.partition(".graph")[0]  # inside a Tap: the LSTM's place is the Tap's path
    module = flat.get_submodule(path)
    path = path.removeprefix("model").removeprefix(".")
    if isinstance(module, Tap):
        return f"'{path}' (LSTM)"
    return (
        f"'{path}' ({type(module).__qualname__})"
        if path
        else f"the model ({type(module).__qualname__})"
    )


def _diagnose(
    model: nn.Module, flat: Flat, args: list[Tensor], dynamic: tuple[Any, ...], e: Exception
) -> ExportError:
    """Why `flat` does not export, naming the user's submodule that was running.

    The exporter's own error comes from its last strategy; torch.export (non-strict) runs the
    module as Python, so the hooks see which submodule failed. Its LSTMs are native-op graphs
    here: they capture without the Scan's limits.
    """
    native, taps = tapped(model, lambda m: NativeOnnxLSTM(m).eval())
    probe = Flat(native, taps, flat.n_inputs, flat.stateful).eval()
    with _running(probe) as stack, _quiet_exporter(), torch.no_grad():
        try:
            torch.export.export(probe, tuple(args), dynamic_shapes=(dynamic,), strict=False)
        except Exception as found:
            return ExportError(f"cannot export {_where(probe, stack)}: {_why(found)}")
    return ExportError(f"cannot export the model: {_why(e)}")


def write_onnx(
    model: nn.Module,
    stateful: bool,
    args: list[Tensor],
    sig: Signature,
    axes: list[dict[int, str]],
    path: Path,
    kind: str,
) -> Path:
    """model.onnx (kind "lstm": NativeOnnxLSTM) or model.scan.onnx (kind "scan")."""
    graph = NativeOnnxLSTM if kind == "lstm" else ScanOnnxLSTM
    graphed, taps = tapped(model, lambda m: graph(m).eval())
    n_user = len(args) - 2 * len(taps) * stateful
    flat = Flat(graphed, taps, n_user, stateful).eval()
    dims: dict[str, Any] = {}
    dynamic = tuple(
        {i: dims.setdefault(n, torch.export.Dim(n.replace(".", "_"))) for i, n in ax.items()}
        for ax in axes
    )
    program, failure = None, None
    with _quiet_exporter(), torch.no_grad():
        # Strict first: the non-strict capture of torch 2.13 fails on the Scan graph's weights.
        for strict in (True, False):
            try:
                program = torch.export.export(
                    flat, tuple(args), dynamic_shapes=(dynamic,), strict=strict
                )
                break
            except Exception as e:
                failure = failure or e
        if program is None:
            assert failure is not None
            raise _diagnose(model, flat, args, dynamic, failure) from failure
        onnx_program = torch.onnx.export(
            program,
            tuple(args),
            dynamo=True,
            input_names=sig.input_names,
            output_names=sig.output_names,
            opset_version=OPSET,
            verbose=False,
        )
    return save_onnx(onnx_program, sig, path, {"lstm_deploy.graph": kind})


def write_torchscript(
    model: nn.Module, n_inputs: int, stateful: bool, args: list[Tensor], path: Path
) -> tuple[Path, str]:
    """model.pt: the module scripted where it scripts (and is not streamable), else traced."""
    why = "streamable: the state inputs and outputs are the Taps'"
    if not stateful:
        scripted_copy = copy.deepcopy(model).requires_grad_(False)
        for _, lstm in _lstms(scripted_copy):
            make_ready(lstm)
        try:
            with _quiet_exporter():
                torch.jit.save(torch.jit.script(scripted_copy), str(path))
            return path, "scripted"
        except Exception as e:  # its own code does not script: trace it around scripted LSTMs
            why = _why(e)

    def scripted(lstm: LSTM) -> nn.Module:
        deploy = DeployLSTM(lstm)
        make_ready(deploy.lstm)
        return torch.jit.script(deploy)

    traced_model, taps = tapped(model, scripted)
    flat = Flat(traced_model, taps, n_inputs, stateful).eval()
    with _running(flat) as stack, _quiet_exporter(), torch.no_grad():
        try:
            traced = torch.jit.trace(flat, tuple(args), check_trace=False)
        except Exception as e:
            raise ExportError(
                f"cannot trace {_where(flat, stack)} for {path.name}: {_why(e)}"
            ) from e
    torch.jit.save(traced, str(path))
    return path, f"traced ({why})"
