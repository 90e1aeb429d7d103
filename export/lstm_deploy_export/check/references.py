"""The references every row is judged against, neither of them a runtime under test.

- the oracle: the scratch module in float64, behind the deployed signature;
- torch.nn.LSTM in float64 with the same weights, always on a packed batch: an implementation of
  `lengths` (`pack_padded_sequence`) that we did not write.

torch.nn.LSTM in float32 is run too, but not to pass against: its error against the oracle
measures how much float32 arithmetic itself loses on this model and input (`eps32`), which the
tolerance allows for (see `compare.Tolerance`).
"""

from __future__ import annotations

import numpy as np
import torch

from lstm_deploy.bundle import Signature
from lstm_deploy.model import LSTM
from lstm_deploy_export.check.runners import Arrays, arrays, nn_lstm, nn_lstm_call, torch_inputs
from lstm_deploy_export.export.graphs import DeployLSTM


class References:
    def __init__(self, model: LSTM, sig: Signature) -> None:
        self.sig = sig
        self.oracle = DeployLSTM(model.double()).eval()
        self.nn = {dtype: nn_lstm(model, dtype) for dtype in (torch.float64, torch.float32)}

    @torch.no_grad()
    def run_oracle(self, inputs: Arrays) -> Arrays:
        return arrays(self.sig, self.oracle(*torch_inputs(inputs, self.sig, dtype=torch.float64)))

    def run_torch(self, inputs: Arrays, dtype: torch.dtype) -> Arrays:
        """torch.nn.LSTM on a packed batch: its own implementation of `lengths`."""
        tensors = torch_inputs(inputs, self.sig, dtype=dtype)
        return arrays(self.sig, nn_lstm_call(self.nn[dtype], tensors, pack=True)())

    def eps32(self, inputs: Arrays, oracle: Arrays) -> tuple[float, dict[str, float]]:
        """torch.nn.LSTM's float32 error on the case: the max over the outputs, and each one.

        One number per case, the max over the outputs: hn alone holds a few hundred values, too
        few for its max to measure the model's conditioning stably.
        """
        nn32 = self.run_torch(inputs, torch.float32)
        errors = {o: float(np.abs(nn32[o] - oracle[o]).max()) for o in self.sig.output_names}
        return max(errors.values()), errors
