"""Read a bundle for serving: ``manifest.json`` and ``model.onnx``, nothing else.

Everything the server knows about the model comes from the manifest: the deployed signature
(names, dtypes, shapes with named dynamic axes), and the Triton config of ``lstm_onnx`` (whose
``max_batch_size`` and ``dynamic_batching.max_queue_delay_microseconds`` are the server's
defaults, and which ``GET .../config`` serves). ``model.onnx`` is checked against the sha256 and
size recorded in the manifest before anything loads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import codecs

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
TRITON_MODEL = "lstm_onnx"  # the key of the served model's config in manifest["triton"]
SUPPORTED_FORMAT = 1


class BundleError(Exception):
    """The bundle is missing, incomplete, tampered with, or not servable."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]  # a str names a dynamic axis ("batch", "sequence")

    @property
    def datatype(self) -> str:
        return codecs.datatype_of(self.dtype)

    @property
    def wire_shape(self) -> list[int]:
        """The shape as KServe metadata shows it: -1 for every dynamic axis."""
        return [d if isinstance(d, int) else -1 for d in self.shape]


@dataclass(frozen=True)
class ModelSpec:
    """The deployed signature, plus the Triton config of the served model."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    triton_config: dict[str, Any]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def max_batch_size(self) -> int:
        return int(self.triton_config.get("max_batch_size", 0))

    @property
    def max_queue_delay_us(self) -> int:
        batching = self.triton_config.get("dynamic_batching") or {}
        return int(batching.get("max_queue_delay_microseconds", 0))


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    spec: ModelSpec

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def _tensor(entry: dict[str, Any]) -> TensorSpec:
    return TensorSpec(entry["name"], np.dtype(entry["dtype"]), tuple(entry["shape"]))


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_signature(spec: ModelSpec) -> None:
    names = {"input", "lengths", "h0", "c0"}
    if {t.name for t in spec.inputs} != names:
        raise BundleError(f"the signature's inputs must be {sorted(names)}")
    if {t.name for t in spec.outputs} != {"output", "hn", "cn"}:
        raise BundleError("the signature's outputs must be ['cn', 'hn', 'output']")


def read_spec(manifest: dict[str, Any]) -> ModelSpec:
    """The served model's spec from a parsed manifest; BundleError if it is incomplete."""
    try:
        signature = manifest["signature"]
        spec = ModelSpec(
            inputs=tuple(_tensor(t) for t in signature["inputs"]),
            outputs=tuple(_tensor(t) for t in signature["outputs"]),
            triton_config=dict(manifest["triton"][TRITON_MODEL]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(
            f"{MANIFEST} has no usable signature or triton.{TRITON_MODEL}: {e!r}"
        ) from None
    _check_signature(spec)
    return spec


def load_bundle(path: str | Path) -> Bundle:
    """Open the bundle at ``path``: parse its manifest, verify model.onnx's sha256 and size."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle not found: {root} is not a directory")
    manifest_path = root / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{root} is not a bundle: it has no {MANIFEST}") from None
    except ValueError as e:
        raise BundleError(f"{manifest_path} is not valid JSON: {e}") from None
    version = manifest.get("format_version")
    if version != SUPPORTED_FORMAT:
        raise BundleError(
            f"{manifest_path}: format_version {version!r} (this server reads {SUPPORTED_FORMAT})"
        )
    model = root / MODEL_FILE
    recorded = manifest.get("files", {}).get(MODEL_FILE)
    if not model.is_file():
        raise BundleError(f"{root} has no {MODEL_FILE} (export the bundle with the onnx artifact)")
    if not recorded or "sha256" not in recorded:
        raise BundleError(f"{MANIFEST} records no sha256 for {MODEL_FILE}")
    if (
        recorded.get("size") not in (None, model.stat().st_size)
        or _sha256(model) != recorded["sha256"]
    ):
        raise BundleError(f"{model} does not match the sha256 in {MANIFEST}: the file was changed")
    return Bundle(root, manifest, read_spec(manifest))
