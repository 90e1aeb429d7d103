"""The deployed signature, declared once as data.

Every artifact (TorchScript, both ONNX graphs, the Triton configs, the manifest the server reads)
takes its tensor names, dtypes and shapes from here. Batch first everywhere, so that servers can
batch every tensor on dimension 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

BATCH = "batch"
SEQUENCE = "sequence"

Dim = int | str  # an int is fixed, a str names a dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" or "int64"
    shape: tuple[Dim, ...]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}


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

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }


def signature(
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    proj_size: int = 0,
) -> Signature:
    """The signature of the deployed model for one LSTM configuration."""
    d = 2 if bidirectional else 1
    h_out = proj_size if proj_size > 0 else hidden_size
    state = num_layers * d
    return Signature(
        inputs=(
            TensorSpec("input", "float32", (BATCH, SEQUENCE, input_size)),
            TensorSpec("lengths", "int64", (BATCH,)),
            TensorSpec("h0", "float32", (BATCH, state, h_out)),
            TensorSpec("c0", "float32", (BATCH, state, hidden_size)),
        ),
        outputs=(
            TensorSpec("output", "float32", (BATCH, SEQUENCE, d * h_out)),
            TensorSpec("hn", "float32", (BATCH, state, h_out)),
            TensorSpec("cn", "float32", (BATCH, state, hidden_size)),
        ),
    )
