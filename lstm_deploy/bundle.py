"""THE bundle contract: file names, format version, the signature as data, the manifest.

A bundle is a directory of artifacts and a `manifest.json` that pins the format version, the
versions that wrote it, the model's config, its deployed signature, and the sha256 and size of
every file. This module is the one place that knows that format:

- the export writes bundles through `file_entry` and `Bundle.write_manifest`;
- validate, bench, the server and the Triton launcher read them through `load_bundle`, which
  checks the manifest's schema (each error names the field), keeps every listed path inside the
  bundle (no `..`, no absolute paths, no symlinks out), and checks sizes and sha256.

Torch-free (numpy-free, even): a serving image reads bundles without PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lstm_deploy.config import LSTMConfig
from lstm_deploy.signature import (
    BATCH,
    C0,
    CN,
    DTYPES,
    H0,
    HN,
    INPUT,
    LENGTHS,
    LSTM_INPUTS,
    LSTM_OUTPUTS,
    LSTM_STATE,
    MANIFEST,
    OUTPUT,
    SEQUENCE,
    TRITON_DTYPES,
    BundleError,
    Dim,
    ModelInfo,
    Signature,
    StateSpec,
    TensorSpec,
    _mapping,
    lstm_info,
    lstm_signature,
    model_info,
)

# The contract's names, the signature's (lstm_deploy.signature) included: import them from here.
__all__ = [
    "AOTI", "ARTIFACTS", "BATCH", "C0", "CN", "DTYPES", "FORMAT_VERSION", "H0", "HN", "INPUT",
    "INT8_ONNX", "KSERVE_DIR", "LENGTHS", "LSTM_INPUTS", "LSTM_OUTPUTS", "LSTM_STATE", "MANIFEST",
    "ONNX", "OUTPUT", "REPORTS", "SCAN_ONNX", "SEQUENCE", "TORCHSCRIPT", "TRITON_DIR",
    "TRITON_DTYPES", "WEIGHTS",
    "Bundle", "BundleError", "Dim", "ModelInfo", "Signature", "StateSpec", "TensorSpec",
    "check_manifest", "file_entry", "load_bundle", "lstm_info", "lstm_signature", "sha256",
]  # fmt: skip

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
TORCHSCRIPT = "model.pt"
ONNX = "model.onnx"
SCAN_ONNX = "model.scan.onnx"
INT8_ONNX = "model.int8.onnx"  # model.onnx with int8 weights (DynamicQuantizeLSTM)
AOTI = "model.pt2"  # torch.export + AOTInductor package (CPU), for AOTIModelPackageLoader
# The --artifacts kinds and their files (int8 is quantized from model.onnx, written after it).
ARTIFACTS = {"torchscript": TORCHSCRIPT, "onnx": ONNX, "int8": INT8_ONNX, "scan": SCAN_ONNX}
ARTIFACTS["aoti"] = AOTI  # last: the slowest to make (a C++ compile)
TRITON_DIR = "triton"
KSERVE_DIR = "kserve"
REPORTS = ("report.json", "report.md")  # validate's, beside the manifest; not in "files"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# -- files ---------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    """The hex sha256 of a file: the one checksum of the project."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """A file's entry in the manifest's "files"."""
    return {"sha256": sha256(path), "size": path.stat().st_size}


def _check_path(name: Any) -> str:
    """A listed file name that stays inside the bundle, or BundleError naming it."""
    field = f"{MANIFEST}: files[{name!r}]"
    if not isinstance(name, str) or not name:
        raise BundleError(f"{field}: a file name must be a non-empty string")
    path = PurePosixPath(name)
    if path.is_absolute() or "\\" in name or re.match(r"^[A-Za-z]:", name):
        raise BundleError(f"{field}: an absolute path; files must be relative to the bundle")
    if any(part in ("..", ".") for part in name.split("/")) or "" in name.split("/"):
        raise BundleError(f"{field}: a path out of the bundle ('..', '.' and '//' are not allowed)")
    return name


def _check_files(files: Any) -> dict[str, dict[str, Any]]:
    files = _mapping(files, "files")
    for name, entry in files.items():
        _check_path(name)
        entry = _mapping(entry, f"files[{name!r}]")
        digest, size = entry.get("sha256"), entry.get("size")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise BundleError(f"{MANIFEST}: files[{name!r}].sha256 must be 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"{MANIFEST}: files[{name!r}].size must be an integer >= 0")
    return files


def check_manifest(manifest: Any) -> dict[str, Any]:
    """The manifest, once its schema holds; BundleError naming the first field that does not."""
    manifest = _mapping(manifest, "the manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST}: format_version is {version!r}, this lstm-deploy reads "
            f"{FORMAT_VERSION}; re-export the bundle with this version of lstm-deploy"
        )
    _check_files(manifest.get("files"))
    Signature.from_json(manifest.get("signature"))
    if "config" in manifest:
        try:
            LSTMConfig.from_dict(_mapping(manifest["config"], "config"))
        except (TypeError, ValueError) as e:
            raise BundleError(f"{MANIFEST}: config: {e}") from None
    for key in ("versions", "triton"):
        if key in manifest:
            _mapping(manifest[key], key)
    skipped = _mapping(manifest.get("skipped", {}), "skipped")
    if not all(isinstance(v, str) for v in skipped.values()):
        raise BundleError(f"{MANIFEST}: skipped must map each file name to the reason (a string)")
    if manifest.get("parity") is not None:
        _mapping(manifest["parity"], "parity")
    model_info(manifest)
    return manifest


# -- the bundle ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A bundle directory and its manifest (schema checked on load)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def signature(self) -> Signature:
        return Signature.from_json(self.manifest["signature"])

    @property
    def info(self) -> ModelInfo:
        """Which input carries lengths, integer ranges, the state a stream carries (both kinds)."""
        return model_info(self.manifest)

    @property
    def whole(self) -> bool:
        """A whole-model bundle (`export_model`: a user's module with LSTMs inside)."""
        return "model" in self.manifest

    @property
    def config(self) -> LSTMConfig:
        if "config" not in self.manifest:
            raise BundleError(f"{self.path / MANIFEST}: no LSTM config (not an LSTM bundle)")
        return LSTMConfig.from_dict(self.manifest["config"])

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def skipped(self, name: str) -> str | None:
        """Why the export left the artifact `name` out (e.g. no C++ compiler for model.pt2)."""
        reason: str | None = self.manifest.get("skipped", {}).get(name)
        return reason

    def file(self, name: str) -> Path:
        """The path of a file listed in the manifest, e.g. "model.onnx"."""
        if not self.has(name):
            raise BundleError(f"{self.path}: the bundle has no {name} (its manifest lists none)")
        return self.path / name

    def verify(self, only: Iterable[str] | None = None) -> None:
        """Check the size and sha256 of every listed file, or of `only` (see `load_bundle`)."""
        names = list(self.manifest["files"])
        if only is not None:
            selected = []
            for want in only:
                found = [
                    n for n in names if n == want or (want.endswith("/") and n.startswith(want))
                ]
                if not found:
                    raise BundleError(
                        f"{self.path}: the bundle has no {want} (its manifest lists none; "
                        "re-export it with that artifact)"
                    )
                selected += found
            names = list(dict.fromkeys(selected))
        files = self.manifest["files"]
        problems = [p for p in (_verify(self.path, n, files[n]) for n in names) if p]
        if problems:
            raise BundleError(f"{self.path}: bundle verification failed: " + "; ".join(problems))

    def write_manifest(self) -> None:
        """Write the manifest (not itself in "files": it holds their checksums)."""
        check_manifest(self.manifest)
        (self.path / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")


def load_bundle(path: str | Path, only: Iterable[str] | None = None) -> Bundle:
    """Read a bundle: the manifest's schema, every listed file's place, then sizes and sha256.

    Args:
        only: check the content (size, sha256) of just these files, or of the files under these
            folders ("triton/lstm_python/"); each must be listed. None checks every file
            (hashing all of them). Every listed path is kept inside the bundle either way.

    Raises:
        BundleError: one line naming the bundle and every problem found.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle not found: {root} is not a directory")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"{root} is not a bundle: it has no {MANIFEST} (write one with `lstm-deploy export`)"
        )
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{manifest_path}: nested too deeply to be a manifest") from None
    try:
        manifest = check_manifest(data)
    except BundleError as e:
        raise BundleError(f"{root}: {e}") from None
    outside = [p for p in (_confined(root, n) for n in manifest["files"]) if p]  # always all
    if outside:
        raise BundleError(f"{root}: bundle verification failed: " + "; ".join(outside))
    bundle = Bundle(root, manifest)
    bundle.verify(only)
    return bundle


def _confined(root: Path, name: str) -> str | None:
    """Whether a listed file, symlinks resolved, stays inside the bundle: None, or the problem."""
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(root / name)]) != real_root:
        return f"{name}: a symlink that leaves the bundle"
    return None


def _verify(root: Path, name: str, entry: Mapping[str, Any]) -> str | None:
    """What is wrong with one listed file's content, or None."""
    file = root / name
    if not file.is_file():
        return f"{name}: missing"
    if file.stat().st_size != entry["size"] or sha256(file) != entry["sha256"]:
        return (
            f"{name}: sha256 mismatch: the file does not match the sha256 in {MANIFEST} "
            "(it changed after export)"
        )
    return None
