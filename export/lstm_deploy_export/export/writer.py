"""The bundle writer: export a model's artifacts into a directory and sign them in its manifest.

The format (file names, the manifest's fields, checksums) is `lstm_deploy.bundle`'s; this module
only produces the files.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lstm_deploy.bundle import (
    AOTI,
    ARTIFACTS,
    FORMAT_VERSION,
    INT8_ONNX,
    KSERVE_DIR,
    MANIFEST,
    ONNX,
    REPORTS,
    TORCHSCRIPT,
    TRITON_DIR,
    WEIGHTS,
    Bundle,
    BundleError,
    ModelInfo,
    file_entry,
    lstm_info,
)
from lstm_deploy.model import LSTM
from lstm_deploy.versions import installed, package_version
from lstm_deploy.weights import check_finite, load_safetensors, save_safetensors
from lstm_deploy_export.export import aoti, triton
from lstm_deploy_export.export.exporters import OPSET, export_onnx, export_torchscript
from lstm_deploy_export.export.graphs import ExportError
from lstm_deploy_export.export.quantize import quantize_onnx

__all__ = ["export_bundle", "load_model", "parse_artifacts", "write_bundle"]


def load_model(bundle: Bundle) -> LSTM:
    """The bundle's model, from its weights (float32, CPU)."""
    return load_safetensors(bundle.file(WEIGHTS))


def parse_artifacts(spec: str | Iterable[str] | None, projected: bool = False) -> list[str]:
    """The artifact kinds to write; None means every one the model supports (`projected`: an
    LSTM with proj_size > 0, which model.onnx cannot express)."""
    if spec is None:
        kinds = list(ARTIFACTS)
        if projected:  # no ONNX LSTM op has a projection; the Scan graph has
            kinds.remove("onnx")
            kinds.remove("int8")  # quantized from model.onnx
        return kinds
    kinds = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [k for k in kinds if k not in ARTIFACTS]
    if unknown or not kinds:
        raise BundleError(
            f"unknown artifacts {unknown or kinds}; choose from {','.join(ARTIFACTS)}"
        )
    if "int8" in kinds and "onnx" not in kinds:
        # model.int8.onnx is model.onnx quantized; the bundle's serving config, its Triton
        # python models and validate's float rows all read model.onnx beside it.
        raise BundleError(
            f"--artifacts int8 needs onnx too: {INT8_ONNX} is {ONNX} quantized "
            f"(e.g. --artifacts {','.join(dict.fromkeys(['onnx', *kinds]))})"
        )
    return kinds


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BundleError(
                f"{out} is not empty; pass --force to overwrite it, or choose another --out"
            )
        for name in [MANIFEST, WEIGHTS, *ARTIFACTS.values(), *REPORTS, TRITON_DIR, KSERVE_DIR]:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def export_bundle(
    model: LSTM,
    out_dir: str | Path,
    artifacts: str | Iterable[str] | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Export `model` into the bundle directory `out_dir` and write its manifest.

    Args:
        artifacts: a subset of "torchscript", "onnx", "int8", "scan", "aoti" (a list or a
            comma-separated string; "int8" needs "onnx"); None for all that the model supports.
            model.pt2 ("aoti") needs a C++ compiler: without one, the default leaves it out and
            the manifest's "skipped" says why (see `aoti.reason_to_skip`).
        force: allow writing into a non-empty directory (its previous bundle files are replaced).
        progress: called with a line of text before each step.

    Raises:
        BundleError: `out_dir` is not empty (without `force`), or `artifacts` is unknown.
        WeightsError: a weight is NaN or Inf.
        ExportError: the model cannot be exported as asked (model.onnx with proj_size > 0,
            "aoti" named without a C++ compiler).
    """
    out = Path(out_dir)
    kinds = parse_artifacts(artifacts, model.proj_size > 0)
    check_finite(model)  # before anything is written: NaN weights make NaN artifacts
    # Also before: named without a C++ compiler, model.pt2 is an error (ExportError).
    aoti_skip = aoti.reason_to_skip(artifacts is not None) if "aoti" in kinds else None
    _prepare(out, force)
    say = progress or (lambda _: None)
    model = model.cpu().float().eval()

    say(f"writing {WEIGHTS}")
    save_safetensors(model, out / WEIGHTS)
    written: dict[str, Path] = {}
    skipped: dict[str, str] = {}  # file -> why the export left it out
    for kind in kinds:
        filename = ARTIFACTS[kind]
        if kind == "int8":
            continue  # from model.onnx, once it is written (below)
        if kind == "aoti":
            if aoti_skip is not None:
                skipped[AOTI] = aoti_skip
                say(f"skipping {AOTI}: {aoti_skip}")
            else:
                try:
                    written[AOTI] = aoti.export_aoti(model, out / AOTI, say)
                except Exception as e:  # Inductor's own failure: the other artifacts still ship
                    if artifacts is not None:
                        raise ExportError(f"AOTInductor could not compile {AOTI}: {e!r}") from e
                    skipped[AOTI] = f"AOTInductor failed: {type(e).__name__}: {e}"[:500]
                    say(f"skipping {AOTI}: {skipped[AOTI]}")
            continue
        say(f"exporting {filename}")
        if kind == "torchscript":
            written[filename] = export_torchscript(model, out / filename)
        else:
            written[filename] = export_onnx(
                model, out / filename, "lstm" if kind == "onnx" else "scan"
            )
    if "int8" in kinds:
        say(f"quantizing {INT8_ONNX}")
        written[INT8_ONNX] = quantize_onnx(written[ONNX], out / INT8_ONNX)
    return write_bundle(
        out, lstm_info(model.config), written, skipped, {"config": model.config.to_dict()}, say
    )


def write_bundle(
    out: Path,
    info: ModelInfo,
    written: Mapping[str, Path],
    skipped: Mapping[str, str],
    described: Mapping[str, Any],
    say: Callable[[str], None],
) -> Bundle:
    """The last steps of every export, an LSTM's or a whole model's: the Triton repository from
    `info`, then the manifest (versions, `described`: "config" or "model", the signature, every
    file's checksum, what was skipped and why) over the files that `out` now holds."""
    say(f"writing {TRITON_DIR}/")
    configs = triton.write_repository(
        out / TRITON_DIR,
        info,
        written.get(ONNX),
        written.get(TORCHSCRIPT),
        int8_model=written.get(INT8_ONNX),
    )
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format_version": FORMAT_VERSION,
        "versions": {
            "lstm_deploy": package_version(),
            "python": sys.version.split()[0],
            "torch": installed("torch"),
            "onnx": installed("onnx"),
            "onnxruntime": installed("onnxruntime"),
        },
        **described,
        "signature": info.signature.to_json(),
        "opset": OPSET,
        "files": {p.relative_to(out).as_posix(): file_entry(p) for p in files},
        "triton": configs,
        "skipped": dict(skipped),
        "parity": None,
    }
    bundle = Bundle(out, manifest)
    bundle.write_manifest()
    return bundle
