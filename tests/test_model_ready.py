"""model.pt's fast path (lstm_deploy._ready): weights made ready once, the GEMMs on MKL or oneDNN
by batch size. Each route against torch.nn.LSTM, through torch.jit.save/load and LibTorch C++."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from lstm_deploy_export.export.exporters import export_torchscript
from lstm_deploy_export.export.graphs import DeployLSTM
from lstm_deploy_export.tools import cpp
from lstm_deploy_export.tools.cpp import TORCHSCRIPT
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from lstm_deploy import LSTM
from lstm_deploy._ready import PROBE_BATCHES, choose_onednn_from_batch, make_ready
from lstm_deploy.bundle import FORMAT_VERSION, Bundle, file_entry, lstm_signature

INPUT, HIDDEN, STEPS = 6, 32, 37
# Batch 64 at hidden 32 projects 16 steps at a time: T 37 runs three chunks (lstm_deploy._fast).
BATCHES = (1, 3, 64)
CONFIGS = [dict(num_layers=2, bidirectional=True), dict(proj_size=5, bias=False)]
ONEDNN_OP = "mkldnn::_linear_pointwise"


def make_inputs(model: LSTM, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """The deployed signature's inputs: lengths that include 1 and the full length, random state."""
    gen = torch.Generator().manual_seed(seed)
    states = model.num_layers * (2 if model.bidirectional else 1)
    h_out = model.proj_size or model.hidden_size
    lengths = torch.randint(1, STEPS + 1, (batch,), generator=gen)
    lengths[0] = STEPS
    lengths[-1] = 1 if batch > 1 else STEPS
    return [
        torch.randn(batch, STEPS, INPUT, generator=gen),
        lengths,
        0.5 * torch.randn(batch, states, h_out, generator=gen),
        0.5 * torch.randn(batch, states, model.hidden_size, generator=gen),
    ]


def nn_lstm_run(model: LSTM, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """torch.nn.LSTM with the model's weights on packed sequences: the reference we did not write."""
    x, lengths, h0, c0 = inputs
    lstm = model.to_torch()
    lstm.batch_first = True
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        out, (hn, cn) = lstm(packed, (h0.transpose(0, 1), c0.transpose(0, 1)))
    output, _ = pad_packed_sequence(out, batch_first=True, total_length=STEPS)
    return [output, hn.transpose(0, 1), cn.transpose(0, 1)]


def assert_matches(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    for name, a, e in zip(("output", "hn", "cn"), actual, expected):
        assert a.shape == e.shape, f"{what} {name}"
        torch.testing.assert_close(a, e, rtol=0, atol=2e-6, msg=f"{what} {name}")


class OpsSeen(TorchDispatchMode):
    """The names of the operators that run, TorchScript's and LibTorch's calls included."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def run(module: torch.nn.Module, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """The module's outputs, and whether the GEMMs ran on oneDNN."""
    with torch.no_grad(), OpsSeen() as ops:
        outputs = list(module(*inputs))
    return outputs, any(name.startswith(ONEDNN_OP) for name in ops.names)


@pytest.mark.parametrize("onednn_from_batch", [0, 2])
@pytest.mark.parametrize("config", CONFIGS, ids=["bidirectional-2-layers", "proj-no-bias"])
def test_each_route_matches_nn_lstm_after_save_and_load(
    config: dict, onednn_from_batch: int, tmp_path: Path
) -> None:
    model = LSTM(INPUT, HIDDEN, **config).eval()
    path = export_torchscript(model, tmp_path / "model.pt", onednn_from_batch=onednn_from_batch)
    loaded = torch.jit.load(str(path))
    for batch in BATCHES:
        inputs = make_inputs(model, batch)
        outputs, onednn = run(loaded, inputs)
        assert_matches(outputs, nn_lstm_run(model, inputs), f"B={batch}")
        # The route is the one asked for: oneDNN from the switch on (0: never), MKL below it.
        assert onednn == (0 < onednn_from_batch <= batch), f"B={batch}"


def test_ready_weights_are_derived_on_load_not_stored(tmp_path: Path) -> None:
    model = LSTM(INPUT, 128).eval()
    ready = export_torchscript(model, tmp_path / "ready.pt", onednn_from_batch=1)
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(DeployLSTM(model)), str(plain))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # The derived and packed weights (over 3x the parameters here) add nothing but code.
    assert ready.stat().st_size < plain.stat().st_size + weight_bytes // 4


def test_stale_ready_weights_are_not_used() -> None:
    model = LSTM(INPUT, HIDDEN, bidirectional=True).eval()
    deploy = DeployLSTM(model)
    make_ready(deploy.lstm, onednn_from_batch=1)
    scripted = torch.jit.script(deploy)
    inputs = make_inputs(model, 3)
    with torch.no_grad():
        # An in-place change of a parameter: the ready weights no longer match it.
        scripted.lstm.weight_hh_l0_reverse.mul_(0.5)
        model.weight_hh_l0_reverse.mul_(0.5)
    outputs, onednn = run(scripted, inputs)
    assert_matches(outputs, nn_lstm_run(model, inputs), "in-place change")
    assert not onednn
    # Another dtype: the eager copy makes them again, the scripted module runs the plain path.
    doubled = [t.double() if t.is_floating_point() else t for t in inputs]
    expected = [t.double() for t in nn_lstm_run(model, inputs)]
    for module in (copy.deepcopy(deploy).double(), scripted.double()):
        assert_matches(run(module, doubled)[0], expected, "float64")


def test_the_route_switch_is_where_onednn_wins_by_the_margin() -> None:
    w = torch.randn(4 * 8, 8)
    assert choose_onednn_from_batch(w, margin=0.0) == 0  # never faster than no time at all
    assert choose_onednn_from_batch(w, margin=1e9) == PROBE_BATCHES[0]  # always fast enough
    assert choose_onednn_from_batch(w.double(), margin=1e9) == 0  # oneDNN's route is float32
    assert choose_onednn_from_batch(w) in (0, *PROBE_BATCHES)


def test_libtorch_runs_both_routes(tmp_path: Path) -> None:
    # The C++ program loads model.pt: __setstate__ derives and packs the weights in LibTorch too.
    programs = cpp.build()
    assert not programs.unavailable, f"the C++ programs must build here: {programs.unavailable}"
    model = LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True).eval()
    path = export_torchscript(model, tmp_path / "model.pt", onednn_from_batch=3)
    # The programs read the signature from the manifest beside the model, as in a bundle.
    signature = lstm_signature(model.config).to_json()
    manifest = {"format_version": FORMAT_VERSION, "files": {path.name: file_entry(path)}}
    Bundle(tmp_path, {**manifest, "signature": signature}).write_manifest()
    for batch in (1, 5):
        inputs = make_inputs(model, batch, seed=batch)
        names = ("input", "lengths", "h0", "c0")
        got = programs.run(TORCHSCRIPT, path, {n: t.numpy() for n, t in zip(names, inputs)})
        for (name, actual), want in zip(got.items(), nn_lstm_run(model, inputs)):
            np.testing.assert_allclose(actual, want.numpy(), rtol=0, atol=2e-6, err_msg=name)
