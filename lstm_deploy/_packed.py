"""A PackedSequence input for the scratch LSTM, as torch.nn.LSTM takes it: eager mode only.

TorchScript cannot take a Tensor or a PackedSequence in one argument, so the scripted module keeps
`lengths=`; in eager mode `LSTM.forward` hands a PackedSequence here, and the LSTM runs on it
through that same `lengths` path: unpack to padded input and lengths, run, re-pack.
"""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

State = tuple[Tensor, Tensor]
Forward = Callable[[Tensor, State | None, Tensor | None], tuple[Tensor, State]]


def forward_packed(
    forward: Forward,
    packed: PackedSequence,
    hx: State | None,
    lengths: Tensor | None,
    batch_first: bool,
    dtype: torch.dtype,
) -> tuple[PackedSequence, State]:
    """`forward` (the LSTM's, on padded input with lengths, parameters of `dtype`) on `packed`.

    hx and the returned (h_n, c_n) are in the caller's batch order, as nn.LSTM has them (it
    permutes hx into the packing's order and back). The output is packed as the input is: the same
    batch_sizes, sorted_indices and unsorted_indices tensors, data in the input's packing order.
    """
    if lengths is not None:
        raise ValueError(
            "LSTM: a PackedSequence input carries its own lengths; expected lengths=None, "
            f"got a tensor of shape {list(lengths.shape)}"
        )
    if packed.data.dtype != dtype:
        # nn.LSTM's packed path skips its ValueError check: its kernel raises a RuntimeError.
        raise RuntimeError(
            f"LSTM: PackedSequence data dtype ({packed.data.dtype}) does not match weight dtype "
            f"({dtype}); convert one of them (packed.to(dtype) or model.to(dtype))"
        )
    # Padded in the caller's order (pad_packed_sequence undoes sorted_indices), lengths on the CPU.
    padded, lengths = pad_packed_sequence(packed, batch_first=batch_first)
    output, state = forward(padded, hx, lengths)
    if packed.sorted_indices is not None:
        # The input's own order, not one sorted again: ties between lengths keep its packing.
        output = output.index_select(0 if batch_first else 1, packed.sorted_indices)
        lengths = lengths[packed.sorted_indices.cpu()]
    data = pack_padded_sequence(output, lengths, batch_first=batch_first).data
    out = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    return out, state
