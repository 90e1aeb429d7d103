"""The signature as data: tensor specs with named dynamic axes, and what tools need beyond them.

Part of the bundle contract (`lstm_deploy.bundle` re-exports every name here): a manifest's
"signature" (inputs and outputs: name, dtype, shape) read and checked, the deployed signature of
an LSTM, and `ModelInfo`, which tells an LSTM bundle and a whole-model bundle alike to validate,
the server and the Triton repository: the lengths input, integer ranges, the state a stream
carries. Torch-free (numpy-free, even).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lstm_deploy.config import LSTMConfig

MANIFEST = "manifest.json"

# The deployed LSTM signature's names, declared once (see `lstm_signature`).
BATCH, SEQUENCE = "batch", "sequence"  # the named dynamic axes
INPUT, LENGTHS, H0, C0 = "input", "lengths", "h0", "c0"
OUTPUT, HN, CN = "output", "hn", "cn"
LSTM_INPUTS = (INPUT, LENGTHS, H0, C0)
LSTM_OUTPUTS = (OUTPUT, HN, CN)

DTYPES = frozenset({"float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"})
# Each dtype's enum in a Triton model config (the manifest's "triton" configs, config.pbtxt).
TRITON_DTYPES = {
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}

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
    """One LSTM's state as a stream carries it: the inputs it starts from, the outputs it ends."""

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


def lstm_info(config: LSTMConfig) -> ModelInfo:
    """An LSTM bundle's ModelInfo: its deployed signature, lengths, one state, streamable unless
    bidirectional (the reverse direction would read steps that have not arrived yet)."""
    return ModelInfo(lstm_signature(config), LENGTHS, {}, (LSTM_STATE,), not config.bidirectional)


def model_info(manifest: dict[str, Any]) -> ModelInfo:
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
    declared = inputs.get(lengths) if isinstance(lengths, str) else None
    if lengths is not None and (
        declared is None or (declared.dtype, declared.shape) != ("int64", (BATCH,))
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


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BundleError(f"{MANIFEST}: {where} must be a JSON object, got {type(value).__name__}")
    return value
