"""The bundle: a directory of artifacts and a manifest pinning versions, signature, checksums."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import lstm_deploy
from lstm_deploy import LSTM, LSTMConfig, load_safetensors, save_safetensors
from lstm_deploy_export import triton
from lstm_deploy_export.exporters import OPSET, export_onnx, export_torchscript, model_signature

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ARTIFACTS = {"torchscript": "model.pt", "onnx": "model.onnx", "scan": "model.scan.onnx"}


class BundleError(Exception):
    """A bundle that cannot be written or read as asked; the message names the file and the fix."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def config(self) -> LSTMConfig:
        return LSTMConfig.from_dict(self.manifest["config"])

    def file(self, name: str) -> Path:
        """The path of an artifact listed in the manifest, e.g. "model.onnx"."""
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: the bundle has no {name} (its manifest lists none)")
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def load_model(self) -> LSTM:
        return load_safetensors(self.file(WEIGHTS))

    def write_manifest(self) -> None:
        write_json(self.path / MANIFEST, self.manifest)


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def parse_artifacts(spec: str | Iterable[str] | None, model: LSTM) -> list[str]:
    """The artifact kinds to write; None means every one the model supports."""
    if spec is None:
        kinds = list(ARTIFACTS)
        if model.proj_size > 0:  # no ONNX LSTM op has a projection; the Scan graph has
            kinds.remove("onnx")
        return kinds
    kinds = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [k for k in kinds if k not in ARTIFACTS]
    if unknown or not kinds:
        raise BundleError(
            f"unknown artifacts {unknown or kinds}; choose from {','.join(ARTIFACTS)}"
        )
    return kinds


def export_bundle(
    model: LSTM,
    out_dir: str | Path,
    artifacts: str | Iterable[str] | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Export `model` into the bundle directory `out_dir` and write its manifest.

    Args:
        artifacts: a subset of "torchscript", "onnx", "scan" (a list or a comma-separated string);
            None for all that the model supports.
        force: allow writing into a non-empty directory (its previous bundle files are replaced).
        progress: called with a line of text before each step.
    """
    out = Path(out_dir)
    kinds = parse_artifacts(artifacts, model)
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BundleError(
                f"{out} is not empty; pass --force to overwrite it, or choose another --out"
            )
        for name in [MANIFEST, WEIGHTS, *ARTIFACTS.values(), "triton", "kserve"]:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _: None)
    model = model.cpu().float().eval()

    say(f"writing {WEIGHTS}")
    save_safetensors(model, out / WEIGHTS)
    written: dict[str, Path] = {}
    for kind in kinds:
        filename = ARTIFACTS[kind]
        say(f"exporting {filename}")
        if kind == "torchscript":
            written[kind] = export_torchscript(model, out / filename)
        else:
            written[kind] = export_onnx(model, out / filename, "lstm" if kind == "onnx" else "scan")
    sig = model_signature(model)
    say("writing triton/")
    configs = triton.write_repository(
        out / "triton", sig, written.get("onnx"), written.get("torchscript")
    )
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format_version": FORMAT_VERSION,
        "versions": {
            "lstm_deploy": lstm_deploy.__version__,
            "python": sys.version.split()[0],
            "torch": _version("torch"),
            "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"),
        },
        "config": model.config.to_dict(),
        "signature": sig.to_json(),
        "opset": OPSET,
        "files": {
            p.relative_to(out).as_posix(): {"sha256": sha256(p), "size": p.stat().st_size}
            for p in files
        },
        "triton": configs,
        "parity": None,
    }
    bundle = Bundle(out, manifest)
    bundle.write_manifest()
    return bundle


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle and check every file against the manifest's sha256 and size."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"{root}: no {MANIFEST}; is this a bundle written by `lstm-deploy export`?"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, this package "
            f"reads {FORMAT_VERSION}; re-export the bundle with this version of lstm-deploy"
        )
    problems = []
    for name, entry in manifest["files"].items():
        file = root / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != entry["size"] or sha256(file) != entry["sha256"]:
            problems.append(f"{name}: sha256 mismatch (the file changed after export)")
    if problems:
        raise BundleError(f"{root}: bundle verification failed: " + "; ".join(problems))
    return Bundle(root, manifest)
