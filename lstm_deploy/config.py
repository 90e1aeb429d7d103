"""An LSTM's configuration as plain data, and the arithmetic that follows from it. Torch-free.

The bundle contract (`lstm_deploy.bundle`) reads it from a manifest without importing torch;
the model (`lstm_deploy.model.LSTM`) is built from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LSTMConfig:
    """The constructor arguments of an LSTM (and of torch.nn.LSTM), as plain data."""

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LSTMConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown LSTM config keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**d)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def real_hidden_size(self) -> int:
        """H_out: the size of h (proj_size when projecting, else hidden_size)."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def gemm_flops(self, batch: int, steps: int) -> int:
        """The GEMM FLOPs of one forward over (batch, steps), multiply + add counted as 2.

        Per layer and direction: 2 * T * B * 4H * (I_l + H_out), plus 2 * T * B * H * P with a
        projection. The pointwise gate math is not counted: it is a few percent of the work.
        """
        d, h, h_out = self.num_directions, self.hidden_size, self.real_hidden_size
        rows = steps * batch
        total = 0
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else d * h_out
            per_direction = 2 * rows * 4 * h * (layer_input + h_out)
            if self.proj_size:
                per_direction += 2 * rows * h * h_out
            total += d * per_direction
        return total
