"""The references every row is judged against, neither of them a runtime under test.

An LSTM bundle's (`References`):

- the oracle: the scratch module in float64, behind the deployed signature;
- torch.nn.LSTM in float64 with the same weights, always on a packed batch: an implementation of
  `lengths` (`pack_padded_sequence`) that we did not write.

A whole-model bundle's (`ModelReferences`), from the user's module with the bundle's weights:

- the oracle: the module with its LSTMs converted (`lstm_deploy.convert`), in float64;
- the module with torch.nn.LSTMs, in float64: the user's own module where it holds nn.LSTMs;
  where it holds lstm_deploy.LSTMs, each becomes an nn.LSTM with the same weights that implements
  a `lengths=` call by pack_padded_sequence (`PackingLSTM`).

Both run the module itself, without export's Taps: a streamable model's state inputs reach each
LSTM, and its final state leaves it, through forward hooks (`ModelCall`).

The torch.nn.LSTM reference in float32 is run too, but not to pass against: its error against the
oracle measures how much float32 arithmetic itself loses on this model and input (`eps32`), which
the tolerance allows for (see `compare.Tolerance`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lstm_deploy import convert
from lstm_deploy._convert import replace_modules
from lstm_deploy.bundle import ModelInfo, Signature
from lstm_deploy.model import LSTM
from lstm_deploy_export.check.runners import Arrays, arrays, nn_lstm, nn_lstm_call, torch_inputs
from lstm_deploy_export.export.graphs import DeployLSTM
from lstm_deploy_export.export.taps import flatten

Call = Callable[[list[Tensor]], Any]  # the signature's inputs in its order -> its outputs


class References:
    """An LSTM bundle's references: the scratch module and torch.nn.LSTM (packed)."""

    def __init__(self, model: LSTM, sig: Signature) -> None:
        oracle = DeployLSTM(model.double()).eval()
        self.sig = sig
        self.oracle: Call = lambda tensors: oracle(*tensors)
        self.torch: dict[torch.dtype, Call] = {
            dtype: functools.partial(_packed, nn_lstm(model, dtype))
            for dtype in (torch.float64, torch.float32)
        }

    @torch.no_grad()
    def run_oracle(self, inputs: Arrays) -> Arrays:
        return arrays(self.sig, self.oracle(torch_inputs(inputs, self.sig, dtype=torch.float64)))

    @torch.no_grad()
    def run_torch(self, inputs: Arrays, dtype: torch.dtype) -> Arrays:
        """torch.nn.LSTM (packed: its own implementation of `lengths`), in `dtype`."""
        return arrays(self.sig, self.torch[dtype](torch_inputs(inputs, self.sig, dtype=dtype)))

    def eps32(self, inputs: Arrays, oracle: Arrays) -> tuple[float, dict[str, float]]:
        """torch.nn.LSTM's float32 error on the case: the max over the outputs, and each one.

        One number per case, the max over the outputs: hn alone holds a few hundred values, too
        few for its max to measure the model's conditioning stably.
        """
        nn32 = self.run_torch(inputs, torch.float32)
        errors = {
            o: float(np.abs(nn32[o].astype(np.float64) - oracle[o]).max(initial=0.0))
            for o in self.sig.output_names
        }
        return max(errors.values()), errors


def _packed(lstm: nn.LSTM, tensors: list[Tensor]) -> tuple[Tensor, ...]:
    return nn_lstm_call(lstm, tensors, pack=True)()


class ModelReferences(References):
    """A whole model's references, from `model` (the user's, with the bundle's weights): converted,
    and with torch.nn.LSTMs; each behind the bundle's signature (`ModelCall`)."""

    def __init__(self, model: nn.Module, info: ModelInfo) -> None:
        self.sig = info.signature
        self.oracle = ModelCall(convert(model).double().eval(), info)
        self.torch = {
            dtype: ModelCall(with_nn_lstms(model).to(dtype).eval(), info)
            for dtype in (torch.float64, torch.float32)
        }


class PackingLSTM(nn.LSTM):
    """torch.nn.LSTM that also takes lstm_deploy.LSTM's `lengths=`, by pack_padded_sequence.

    Outputs at t >= length are 0 (pad_packed_sequence's padding, to the input's length); (h_n,
    c_n) are each sequence's state after its last valid step: nn.LSTM's own answer.
    """

    def forward(  # type: ignore[override]
        self,
        input: Tensor,
        hx: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if lengths is None or isinstance(input, PackedSequence):
            return super().forward(input, hx)
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
        if not batched and hx is not None:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        steps = x.shape[1 if self.batch_first else 0]
        packed = pack_padded_sequence(
            x, lengths.reshape(-1).cpu(), batch_first=self.batch_first, enforce_sorted=False
        )
        out, (hn, cn) = super().forward(packed, hx)
        output, _ = pad_packed_sequence(out, batch_first=self.batch_first, total_length=steps)
        if not batched:
            return output.squeeze(0 if self.batch_first else 1), (hn.squeeze(1), cn.squeeze(1))
        return output, (hn, cn)


def with_nn_lstms(model: nn.Module) -> nn.Module:
    """A copy of `model` whose lstm_deploy.LSTMs are `PackingLSTM`s with the same weights (its
    torch.nn.LSTMs stay as they are); an LSTM shared under several names stays shared."""
    return replace_modules(copy.deepcopy(model), LSTM, _packing)[0]


def _packing(ours: LSTM) -> PackingLSTM:
    # dropout off: a reference for inference (nn.LSTM warns of it on one layer)
    lstm = PackingLSTM(**dataclasses.replace(ours.config, dropout=0.0).to_dict())
    lstm.load_state_dict(ours.state_dict())
    return lstm.train(ours.training)


class ModelCall:
    """`model` behind the bundle's signature: the inputs positional, the outputs one flat list.

    A streamable model's state inputs (`<lstm>.h0`, `<lstm>.c0`, batch first) become each LSTM's
    `hx` where the model passes none, and each LSTM's final (h_n, c_n) becomes its `<lstm>.hn`,
    `<lstm>.cn` outputs, by forward hooks on the LSTM modules (nn.LSTM's or ours alike).
    """

    def __init__(self, model: nn.Module, info: ModelInfo) -> None:
        self.model = model
        self.n_inputs = len(info.signature.inputs) - len(info.state_inputs)
        self.lstms = [model.get_submodule(spec.h0.removesuffix(".h0")) for spec in info.state]

    def __call__(self, tensors: list[Tensor]) -> list[Tensor]:
        inputs, states = tensors[: self.n_inputs], tensors[self.n_inputs :]
        finals: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.lstms]
        handles = []
        try:
            for k, lstm in enumerate(self.lstms):
                given = (states[2 * k], states[2 * k + 1])
                handles.append(lstm.register_forward_pre_hook(_give_state(given), with_kwargs=True))
                handles.append(lstm.register_forward_hook(_keep_state(finals[k])))
            outputs = flatten(self.model(*inputs))
        finally:
            for handle in handles:
                handle.remove()
        for k, kept in enumerate(finals):
            if len(kept) != 1:
                raise ValueError(
                    f"the model called its LSTM #{k} {len(kept)} times; a streamable model "
                    "calls each of its LSTMs once per forward"
                )
        return [*outputs, *(t for kept in finals for t in kept[0])]


def _give_state(state: tuple[Tensor, Tensor]) -> Callable[..., Any]:
    """A pre-hook that passes `state` (batch first) as the LSTM's hx, unless the call has one."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if (len(args) > 1 and args[1] is not None) or kwargs.get("hx") is not None:
            return None
        x = args[0] if args else kwargs["input"]
        batched = isinstance(x, PackedSequence) or x.dim() == 3
        if batched:  # (B, L*D, H) -> nn.LSTM's (L*D, B, H)
            hx = tuple(s.transpose(0, 1).contiguous() for s in state)
        else:  # an unbatched call: one sequence, (L*D, H)
            hx = tuple(s[0] for s in state)
        if len(args) > 1:
            return (args[0], hx, *args[2:]), kwargs
        return args, {**kwargs, "hx": hx}

    return hook


def _keep_state(kept: list[tuple[Tensor, Tensor]]) -> Callable[..., None]:
    """A forward hook that keeps the LSTM's final (h_n, c_n), batch first."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        hn, cn = output[1]
        if hn.dim() == 3:
            kept.append((hn.transpose(0, 1), cn.transpose(0, 1)))
        else:
            kept.append((hn.unsqueeze(0), cn.unsqueeze(0)))

    return hook
