"""What the server serves, from a bundle read through the contract (`lstm_deploy.bundle`).

Everything the server knows about the model comes from the manifest: the deployed signature
(names, dtypes, shapes with named dynamic axes), and the Triton config of ``lstm_onnx`` (whose
``max_batch_size`` and ``dynamic_batching.max_queue_delay_microseconds`` are the server's
defaults, and which ``GET .../config`` serves). ``load`` verifies ``model.onnx`` against its
sha256 and size before anything loads it; the bundle's other artifacts are not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lstm_deploy.bundle import (
    LSTM_INPUTS,
    LSTM_OUTPUTS,
    MANIFEST,
    ONNX,
    Bundle,
    BundleError,
    Signature,
    load_bundle,
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
    streamable = not bundle.config.bidirectional
    return ModelSpec(sig.inputs, sig.outputs, dict(config), streamable)


def load(path: str | Path) -> tuple[Bundle, ModelSpec]:
    """The bundle at ``path``, its model.onnx verified, and the spec of the model it serves."""
    bundle = load_bundle(path, only=[ONNX])
    return bundle, read_spec(bundle)
