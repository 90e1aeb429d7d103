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
import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lstm_deploy.config import LSTMConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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

# The deployed LSTM signature's names, declared once (see `lstm_signature`).
BATCH, SEQUENCE = "batch", "sequence"  # the named dynamic axes
INPUT, LENGTHS, H0, C0 = "input", "lengths", "h0", "c0"
OUTPUT, HN, CN = "output", "hn", "cn"
LSTM_INPUTS = (INPUT, LENGTHS, H0, C0)
LSTM_OUTPUTS = (OUTPUT, HN, CN)

DTYPES = frozenset({"float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Dim = int | str  # an int is fixed, a str names a dynamic axis


class BundleError(Exception):
    """A bundle that cannot be written or read as asked: one line naming the file or field."""


# -- the signature -------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a numpy dtype name, one of DTYPES
    shape: tuple[Dim, ...]

    @property
    def wire_shape(self) -> list[int]:
        """The shape as KServe metadata and Triton configs write it: -1 for a dynamic axis."""
        return [d if isinstance(d, int) else -1 for d in self.shape]

    def concrete(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with each dynamic axis replaced by its size in `sizes` ({"batch": 2})."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, entry: Any, where: str) -> TensorSpec:
        entry = _mapping(entry, where)
        name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
        if not isinstance(name, str) or not name:
            raise BundleError(f"{MANIFEST}: {where}.name must be a non-empty string")
        if dtype not in DTYPES:
            raise BundleError(
                f"{MANIFEST}: {where}.dtype is {dtype!r}; expected one of {sorted(DTYPES)}"
            )
        if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
            raise BundleError(
                f"{MANIFEST}: {where}.shape must be a list of sizes >= 0 and axis names"
            )
        return cls(name, dtype, tuple(shape))


def _is_dim(d: Any) -> bool:
    return (isinstance(d, str) and d != "") or (
        isinstance(d, int) and not isinstance(d, bool) and d >= 0
    )


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @classmethod
    def from_json(cls, entry: Any, where: str = "signature") -> Signature:
        entry = _mapping(entry, where)
        lists = {}
        for side in ("inputs", "outputs"):
            items = entry.get(side)
            if not isinstance(items, list) or not items:
                raise BundleError(f"{MANIFEST}: {where}.{side} must be a non-empty list")
            lists[side] = tuple(
                TensorSpec.from_json(t, f"{where}.{side}[{i}]") for i, t in enumerate(items)
            )
        names = [t.name for t in (*lists["inputs"], *lists["outputs"])]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise BundleError(f"{MANIFEST}: {where}: tensor names repeated: {repeated}")
        return cls(lists["inputs"], lists["outputs"])


def lstm_signature(config: LSTMConfig) -> Signature:
    """The deployed signature of an LSTM: batch first everywhere, so servers batch on axis 0."""
    state = config.num_layers * config.num_directions
    h, h_out = config.hidden_size, config.real_hidden_size
    return Signature(
        inputs=(
            TensorSpec(INPUT, "float32", (BATCH, SEQUENCE, config.input_size)),
            TensorSpec(LENGTHS, "int64", (BATCH,)),
            TensorSpec(H0, "float32", (BATCH, state, h_out)),
            TensorSpec(C0, "float32", (BATCH, state, h)),
        ),
        outputs=(
            TensorSpec(OUTPUT, "float32", (BATCH, SEQUENCE, config.num_directions * h_out)),
            TensorSpec(HN, "float32", (BATCH, state, h_out)),
            TensorSpec(CN, "float32", (BATCH, state, h)),
        ),
    )


@dataclass(frozen=True)
class StateSpec:
    """One LSTM's state as a stream carries it: the inputs it starts from, the outputs it ends in."""

    h0: str
    c0: str
    hn: str
    cn: str

    def to_json(self) -> dict[str, str]:
        return {"h0": self.h0, "c0": self.c0, "hn": self.hn, "cn": self.cn}


LSTM_STATE = StateSpec(H0, C0, HN, CN)


@dataclass(frozen=True)
class ModelInfo:
    """What the tools need to know beyond the signature, alike for both kinds of bundle.

    - `lengths`: the input that carries each sequence's length (int64 [batch]), or None: then the
      model sees every sequence whole, and a server batches only requests of equal shapes;
    - `ranges`: each integer input's values, [low, high) (token ids: [0, vocabulary size));
    - `state`: each LSTM's (h, c) as inputs and outputs of the signature, in the model's order;
    - `streamable`: whether chunks run one after another, carrying `state`, equal one whole run
      (unidirectional LSTMs and a per-step head); the server's sequences need it.
    - `whole`: a whole-model bundle (`export_model`, manifest "model") rather than an LSTM bundle.
    """

    signature: Signature
    lengths: str | None = None
    ranges: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    state: tuple[StateSpec, ...] = ()
    streamable: bool = False
    whole: bool = False

    @property
    def state_inputs(self) -> tuple[str, ...]:
        return tuple(n for s in self.state for n in (s.h0, s.c0))

    @property
    def state_outputs(self) -> tuple[str, ...]:
        return tuple(n for s in self.state for n in (s.hn, s.cn))


def _model_info(manifest: dict[str, Any]) -> ModelInfo:
    """The manifest's ModelInfo; BundleError naming the field that does not hold."""
    sig = Signature.from_json(manifest.get("signature"))
    if "model" not in manifest:  # an LSTM bundle: the deployed signature of lstm_signature
        config = LSTMConfig.from_dict(manifest["config"]) if "config" in manifest else None
        names = set(sig.input_names) | set(sig.output_names)
        lstm = set(LSTM_INPUTS) | set(LSTM_OUTPUTS)
        return ModelInfo(
            sig,
            lengths=LENGTHS if LENGTHS in names else None,
            state=(LSTM_STATE,) if lstm <= names else (),
            streamable=config is not None and not config.bidirectional and lstm <= names,
        )
    model = _mapping(manifest["model"], "model")
    inputs = {t.name: t for t in sig.inputs}
    outputs = {t.name for t in sig.outputs}
    lengths = model.get("lengths")
    if lengths is not None and (
        lengths not in inputs or inputs[lengths].dtype != "int64" or inputs[lengths].shape != (BATCH,)
    ):
        raise BundleError(
            f"{MANIFEST}: model.lengths is {lengths!r}; it must name an int64 [batch] input"
        )
    ranges: dict[str, tuple[int, int]] = {}
    for name, pair in _mapping(model.get("ranges", {}), "model.ranges").items():
        if (
            name not in inputs
            or not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            or pair[0] >= pair[1]
        ):
            raise BundleError(
                f"{MANIFEST}: model.ranges[{name!r}] must be [low, high) of one of the inputs"
            )
        ranges[name] = (pair[0], pair[1])
    state = []
    for i, entry in enumerate(model.get("state") or []):
        entry = _mapping(entry, f"model.state[{i}]")
        try:
            spec = StateSpec(*(entry[k] for k in ("h0", "c0", "hn", "cn")))
        except KeyError as e:
            raise BundleError(f"{MANIFEST}: model.state[{i}] has no {e}") from None
        if spec.h0 not in inputs or spec.c0 not in inputs or {spec.hn, spec.cn} - outputs:
            raise BundleError(
                f"{MANIFEST}: model.state[{i}] names tensors that the signature does not have"
            )
        state.append(spec)
    streamable = model.get("streamable", False)
    if not isinstance(streamable, bool) or (streamable and not state):
        raise BundleError(f"{MANIFEST}: model.streamable must be a bool, and needs model.state")
    return ModelInfo(sig, lengths, ranges, tuple(state), streamable, whole=True)


# -- files ---------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    """The hex sha256 of a file: the one checksum of the project."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """A file's entry in the manifest's "files"."""
    return {"sha256": sha256(path), "size": path.stat().st_size}


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BundleError(f"{MANIFEST}: {where} must be a JSON object, got {type(value).__name__}")
    return value


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
    _model_info(manifest)
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
        return _model_info(self.manifest)

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
