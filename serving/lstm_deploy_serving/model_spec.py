"""What the server serves, from a bundle read through the contract (`lstm_deploy.bundle`).

Everything the server knows about the model comes from the manifest: the deployed signature
(names, dtypes, shapes with named dynamic axes), and the Triton config of ``lstm_onnx`` (whose
``max_batch_size`` and ``dynamic_batching.max_queue_delay_microseconds`` are the server's
defaults, and which ``GET .../config`` serves). ``load`` verifies ``model.onnx`` against its
sha256 and size before anything loads it; the bundle's other artifacts are not read.

The manifest is not itself checksummed (it holds the checksums), so an edited signature passes
``load``; ``read_spec`` checks it against the manifest's own LSTM config, and ``check_graph``
against the graph ONNX Runtime loaded, so that the server refuses to start rather than answer
every request with ONNX Runtime's error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lstm_deploy.bundle import (
    LSTM_INPUTS,
    LSTM_OUTPUTS,
    MANIFEST,
    ONNX,
    Bundle,
    BundleError,
    Signature,
    TensorSpec,
    load_bundle,
    lstm_signature,
)

TRITON_MODEL = "lstm_onnx"  # the key of the served model's config in manifest["triton"]


@dataclass(frozen=True)
class ModelSpec(Signature):
    """The deployed signature (inputs, outputs), plus the Triton config of the served model."""

    triton_config: dict[str, Any]
    # Whether chunks of a sequence may come in separate requests, (h, c) kept between them:
    # not for a bidirectional LSTM, whose backward direction starts at the sequence's last step.
    streamable: bool = True

    @property
    def max_batch_size(self) -> int:
        return int(self.triton_config.get("max_batch_size", 0))

    @property
    def max_queue_delay_us(self) -> int:
        batching = self.triton_config.get("dynamic_batching") or {}
        return int(batching.get("max_queue_delay_microseconds", 0))


def read_spec(bundle: Bundle) -> ModelSpec:
    """The served model's spec; BundleError if the bundle is not an LSTM bundle with lstm_onnx."""
    sig = bundle.signature
    if tuple(sig.input_names) != LSTM_INPUTS or tuple(sig.output_names) != LSTM_OUTPUTS:
        raise BundleError(
            f"{bundle.path / MANIFEST}: the signature is {sig.input_names} -> {sig.output_names}; "
            f"this server serves LSTM bundles, {list(LSTM_INPUTS)} -> {list(LSTM_OUTPUTS)}"
        )
    config = bundle.manifest.get("triton", {}).get(TRITON_MODEL)
    if not isinstance(config, dict):
        raise BundleError(
            f"{bundle.path / MANIFEST}: triton.{TRITON_MODEL} is missing; re-export the bundle "
            "with the onnx artifact"
        )
    problems = _differences(sig, "signature", lstm_signature(bundle.config), "config")
    if problems:
        raise BundleError(
            f"{bundle.path / MANIFEST}: its signature and its LSTM config disagree: "
            + "; ".join(problems)
            + " (re-export the bundle)"
        )
    streamable = not bundle.config.bidirectional
    return ModelSpec(sig.inputs, sig.outputs, dict(config), streamable)


class GraphTensor(Protocol):
    """A graph input or output as ONNX Runtime describes it (``session.get_inputs()``)."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[int | str | None]: ...


# ONNX Runtime's tensor types -> the manifest's dtypes.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _graph_spec(t: GraphTensor) -> TensorSpec:
    # A dynamic axis is a name (or None: unnamed) in ONNX Runtime; "?" stands for the unnamed.
    shape = tuple(d if isinstance(d, int) else d or "?" for d in t.shape)
    return TensorSpec(t.name, _ORT_DTYPES.get(t.type, t.type), shape)


def _text(t: TensorSpec) -> str:
    return f"{t.dtype} [{', '.join(str(d) for d in t.shape)}]"


def _agrees(manifest: TensorSpec, graph: TensorSpec) -> bool:
    """Same dtype and rank, and each of the graph's fixed dims fixed alike in the manifest."""
    return (
        manifest.dtype == graph.dtype
        and len(manifest.shape) == len(graph.shape)
        and all(not isinstance(g, int) or m == g for m, g in zip(manifest.shape, graph.shape))
    )


def _differences(
    a: Signature, a_name: str, b: Signature, b_name: str, exact: bool = True
) -> list[str]:
    problems = []
    for side in ("inputs", "outputs"):
        kind = side[:-1]
        ours = {t.name: t for t in getattr(a, side)}
        theirs = {t.name: t for t in getattr(b, side)}
        for name in ours.keys() - theirs.keys():
            problems.append(f"{a_name} has {kind} '{name}', {b_name} has none")
        for name in theirs.keys() - ours.keys():
            problems.append(f"{b_name} has {kind} '{name}', {a_name} has none")
        for name in ours.keys() & theirs.keys():
            mine, other = ours[name], theirs[name]
            if (mine != other) if exact else not _agrees(mine, other):
                problems.append(f"{kind} '{name}': {a_name} {_text(mine)}, {b_name} {_text(other)}")
    return sorted(problems)


def check_graph(
    spec: Signature,
    inputs: Sequence[GraphTensor],
    outputs: Sequence[GraphTensor],
    where: Path,
) -> None:
    """BundleError in one line naming every disagreement between the manifest's signature and
    the graph's inputs and outputs (``where``: the bundle): names, dtypes, ranks, and the
    graph's fixed dims (a dim the graph leaves dynamic may be fixed in the manifest)."""
    graph = Signature(tuple(_graph_spec(t) for t in inputs), tuple(_graph_spec(t) for t in outputs))
    problems = _differences(spec, MANIFEST, graph, ONNX, exact=False)
    if problems:
        raise BundleError(
            f"{where}: {MANIFEST} and {ONNX} disagree: "
            + "; ".join(problems)
            + " (re-export the bundle, or restore its manifest)"
        )


def load(path: str | Path) -> tuple[Bundle, ModelSpec]:
    """The bundle at ``path``, its model.onnx verified, and the spec of the model it serves."""
    bundle = load_bundle(path, only=[ONNX])
    return bundle, read_spec(bundle)
