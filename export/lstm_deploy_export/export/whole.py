"""Whole-model bundles: a user's module with LSTMs inside (Embedding -> LSTM -> Linear, ...).

`export_model` writes the same bundle as an LSTM's, with the model's own signature: every
`torch.nn.LSTM` is converted (`lstm_deploy.convert`), then each `lstm_deploy.LSTM` in the tree is
replaced, in a copy, by a `Tap` around the deployed form of the artifact being written:

- model.onnx: `NativeOnnxLSTM` (native ONNX `LSTM` ops, exact at variable lengths everywhere);
- model.scan.onnx: `ScanOnnxLSTM` (the cell inside a `Scan`);
- model.pt: the module itself, scripted; where its code does not script, or where the model is
  streamable, traced around each LSTM scripted (`DeployLSTM`), so that the loop over time stays
  a loop and the sequence length stays free.

A Tap keeps the LSTM's interface (input, hx, lengths; batch first or not; unbatched) and, for a
streamable model, takes its initial state from and gives its final state to extra inputs and
outputs of the signature (`<lstm>.h0`, `<lstm>.c0` in; `<lstm>.hn`, `<lstm>.cn` out; batch first).
The graphs are captured once with `torch.export` (dynamic batch and sequence), so that an error
names the submodule that was running when the capture failed.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lstm_deploy import convert
from lstm_deploy.bundle import (
    AOTI,
    INT8_ONNX,
    ONNX,
    SCAN_ONNX,
    TORCHSCRIPT,
    WEIGHTS,
    Bundle,
    BundleError,
    ModelInfo,
)
from lstm_deploy.weights import check_finite
from lstm_deploy_export.export.graphs import DeployLSTM, ExportError
from lstm_deploy_export.export.plan import (
    CAPTURE,
    check_streamable,
    make_plan,
    other_axis_sizes,
    signature,
    state_specs,
    with_state,
)
from lstm_deploy_export.export.quantize import quantize_onnx
from lstm_deploy_export.export.taps import (
    Flat,
    _lstms,
    tapped,
    write_onnx,
    write_torchscript,
)
from lstm_deploy_export.export.writer import _prepare, parse_artifacts, write_bundle

__all__ = ["export_model", "load_factory", "load_state_dict", "load_whole_model"]

# Recurrent modules that lstm_deploy does not export (nn.LSTM is converted before this is asked).
UNSUPPORTED = (nn.RNNBase, nn.RNNCellBase)

# -- what the model is -----------------------------------------------------------------------


def _refuse_unsupported(model: nn.Module) -> None:
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, UNSUPPORTED)]
    if found:
        path, module = found[0]
        raise ExportError(
            f"cannot export '{path or '<model>'}': {type(module).__module__}."
            f"{type(module).__qualname__} is a recurrent type that lstm-deploy does not export "
            "(it exports LSTMs: torch.nn.LSTM or lstm_deploy.LSTM); replace it with an LSTM"
        )


# -- export ----------------------------------------------------------------------------------


def export_model(
    model: nn.Module,
    example_inputs: Mapping[str, Tensor],
    out: str | Path,
    *,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    output_names: Sequence[str] | None = None,
    lengths: str | None = None,
    input_ranges: Mapping[str, tuple[int, int]] | None = None,
    streamable: bool = False,
    artifacts: str | Iterable[str] | None = None,
    factory: str | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Write a bundle for `model`, any module whose recurrent parts are LSTMs.

    Every torch.nn.LSTM inside is converted to lstm_deploy.LSTM first (`lstm_deploy.convert`, on
    a copy); `model` itself is left as it is.

    Args:
        example_inputs: the inputs by name, in the order of forward's parameters; their dtypes,
            ranks and fixed sizes are the signature's (floats become float32).
        dynamic_axes: input name -> {axis: name}, as torch.onnx.export's; the default makes
            axis 0 "batch" and, for inputs of rank >= 2, axis 1 "sequence". Output axes (by
            output index or name) may be named too; the others take the name of the input axis
            they follow (found by running the model at two sizes).
        output_names: the outputs' names, after flattening tuples (default output0, output1...).
        lengths: the input that carries each sequence's length (int64 [batch]); an input named
            "lengths" of rank 1 is taken as it by default.
        input_ranges: name -> (low, high): the values of each integer input (token ids), which
            validate draws from and the server checks. Required for integer inputs.
        streamable: serve the model in chunks (sequences), carrying each LSTM's (h, c): checked
            here (unidirectional LSTMs; chunks carried through must equal one whole run).
        artifacts: "torchscript", "onnx", "int8", "scan" (default: all that the model supports).
        factory: "package.module:function" that returns the model (recorded for validate).

    Raises:
        ExportError: the model cannot be exported (naming the submodule and the reason).
        BundleError: `out` is not empty (without `force`) or `artifacts` is unknown.
        WeightsError: a weight is NaN or Inf.
    """
    say = progress or (lambda _: None)
    original = model
    model = convert(model).cpu().float().eval()
    _refuse_unsupported(model)
    lstms = _lstms(model)
    if not lstms:
        raise ExportError(
            f"{type(original).__qualname__} holds no LSTM; export_model exports models with "
            "LSTMs (torch.nn.LSTM or lstm_deploy.LSTM) inside"
        )
    check_finite(model)
    plan = make_plan(model, example_inputs, dynamic_axes, lengths, input_ranges)
    projected = any(m.proj_size > 0 for _, m in lstms)
    kinds = _kinds(artifacts, projected)
    state = state_specs(lstms, streamable)

    # The signature: inputs from the plan, outputs from running the model (eager) at two sizes.
    eager, taps = tapped(model, lambda m: DeployLSTM(m).eval())
    flat = Flat(eager, taps, len(plan.names), stateful=bool(state)).eval()
    plan_all = with_state(plan, state, lstms)
    sig = signature(flat, plan_all, state, output_names, dynamic_axes)
    if state:
        check_streamable(flat, plan_all, sig)

    out_dir = Path(out)
    _prepare(out_dir, force)
    say(f"writing {WEIGHTS}")
    _save_weights(model, out_dir / WEIGHTS)
    args = plan_all.inputs(plan_all.sizes(CAPTURE))
    axes = [plan_all.axes[n] for n in plan_all.names]
    written: dict[str, Path] = {}
    how = ""
    for kind in kinds:
        if kind == "int8":
            continue
        filename = {"torchscript": TORCHSCRIPT, "onnx": ONNX, "scan": SCAN_ONNX}[kind]
        say(f"exporting {filename}")
        if kind == "torchscript":
            written[filename], how = write_torchscript(
                model, len(plan.names), bool(state), args, out_dir / filename
            )
            say(f"  {filename}: {how}")
            continue
        written[filename] = write_onnx(
            model, bool(state), args, sig, axes, out_dir / filename,
            "lstm" if kind == "onnx" else "scan",
        )  # fmt: skip
    if "int8" in kinds:
        say(f"quantizing {INT8_ONNX}")
        written[INT8_ONNX] = quantize_onnx(written[ONNX], out_dir / INT8_ONNX)
    model_entry = {
        "class": f"{type(original).__module__}.{type(original).__qualname__}",
        "factory": factory,
        "lengths": plan.lengths,
        "ranges": {k: list(v) for k, v in plan.ranges.items()},
        "streamable": bool(state),
        "state": [s.to_json() for s in state],
        "lstms": {path: m.config.to_dict() for path, m in lstms},
        "axes": other_axis_sizes(plan),
        "torchscript": how or None,
    }
    info = ModelInfo(
        sig, plan.lengths, plan.ranges, tuple(state), streamable=bool(state), whole=True
    )
    skipped = {AOTI: "model.pt2 is written for LSTM bundles only (lstm-deploy export)"}
    return write_bundle(out_dir, info, written, skipped, {"model": model_entry}, say)


def _kinds(artifacts: str | Iterable[str] | None, projected: bool) -> list[str]:
    if artifacts is None:
        return [k for k in parse_artifacts(None, projected) if k != "aoti"]
    kinds = parse_artifacts(artifacts, projected)
    if "aoti" in kinds:
        raise ExportError(f"{AOTI} is written for LSTM bundles only; leave aoti out of artifacts")
    if projected and ("onnx" in kinds or "int8" in kinds):
        raise ExportError(
            "model.onnx cannot express an LSTM with proj_size > 0 (the ONNX LSTM op has no "
            "projection): export model.scan.onnx instead (artifacts torchscript,scan)"
        )
    return kinds


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path), metadata={"lstm_deploy.model": type(model).__qualname__})


# -- reading a whole-model bundle back --------------------------------------------------------


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The function named by "package.module:function" (or a class: called with no arguments)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # as `python -m` does: the user's package beside them
        sys.path.insert(0, os.getcwd())
    if not module_name or not attr:
        raise ExportError(f"--module {spec!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ExportError(
            f"--module {spec!r}: cannot import {module_name} ({e}); run from the directory that "
            "holds it, or install its package"
        ) from None
    try:
        target = module
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ExportError(f"--module {spec!r}: {module_name} has no {attr}") from None
    if not callable(target):
        raise ExportError(f"--module {spec!r}: {attr} is not callable")
    return target


def load_state_dict(model: nn.Module, path: Path) -> None:
    """Load a state_dict file (safetensors; or torch.save, read weights_only) into `model`."""
    from safetensors.torch import load_file

    state: Any
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except Exception as e:
        raise BundleError(f"{path}: cannot read a state_dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, Mapping):
        raise BundleError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(
            f"{path} does not fit {type(model).__qualname__}: {' '.join(str(e).split())[:400]}"
        ) from None


def load_whole_model(bundle: Bundle, module: str | nn.Module | None = None) -> nn.Module:
    """The bundle's model as the user wrote it (unconverted), with the bundle's weights.

    `module`: the model itself, or "package.module:function" that makes it; default the
    factory the manifest records.
    """
    from safetensors.torch import load_model

    spec = module if module is not None else bundle.manifest["model"].get("factory")
    if spec is None:
        raise BundleError(
            f"{bundle.path}: the manifest records no factory of the model (it was exported from "
            "Python); pass the model (validate(..., model=...)) or --module package.module:function"
        )
    model = load_factory(spec)() if isinstance(spec, str) else copy.deepcopy(spec)
    if not isinstance(model, nn.Module):
        raise BundleError(f"{spec}: returned a {type(model).__name__}, not an nn.Module")
    try:
        load_model(model, str(bundle.file(WEIGHTS)), strict=True)
    except RuntimeError as e:
        raise BundleError(
            f"{bundle.path}: {WEIGHTS} does not fit {type(model).__qualname__}: "
            f"{str(e).splitlines()[0]}"
        ) from None
    return model.eval()
