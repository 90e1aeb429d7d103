"""lstm_deploy.convert: a user's module with its torch.nn.LSTMs replaced computes what it computed.

The reference is always the original, unconverted module (torch.nn.LSTM inside), run in float64.
"""

from __future__ import annotations

import doctest
import random
import warnings

import pytest
import torch
import torch.nn.utils.prune
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.testing import assert_close

import lstm_deploy
from lstm_deploy import LSTM, ConversionError, convert

CONFIG_KEYS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
               "bidirectional", "proj_size")  # fmt: skip


class Stack(nn.Module):
    """Embedding or Linear, then 1-3 nn.LSTMs drawn from `rng` with LayerNorms, then a Linear."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.tokens = rng.random() < 0.5
        features = rng.choice((4, 5))
        self.embed = nn.Embedding(11, features) if self.tokens else nn.Linear(3, features)
        self.lstms = nn.ModuleList()
        self.norms = nn.ModuleList()
        for _ in range(rng.randint(1, 3)):
            hidden, proj, bi = rng.choice((5, 6)), rng.choice((0, 0, 2)), rng.random() < 0.5
            lstm = nn.LSTM(
                features, hidden, num_layers=rng.randint(1, 2), bias=rng.random() < 0.7,
                batch_first=rng.random() < 0.5, bidirectional=bi, proj_size=proj,
            )  # fmt: skip
            lstm.requires_grad_(rng.random() < 0.8)
            features = (2 if bi else 1) * (proj or hidden)
            self.lstms.append(lstm)
            self.norms.append(nn.LayerNorm(features))
        self.head = nn.Linear(features, 2)

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None) -> list[Tensor]:
        x = self.embed(x)  # (B, T, F)
        outputs = []
        for k, (lstm, norm) in enumerate(zip(self.lstms, self.norms)):
            state = hx if k == 0 else None
            if lstm.batch_first:
                x, (h, c) = lstm(x, state)
            else:
                x, (h, c) = lstm(x.transpose(0, 1), state)
                x = x.transpose(0, 1)
            x = norm(x)
            outputs += [h, c]
        return [self.head(x), *outputs]

    def inputs(self, batch: int, steps: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = (
            torch.randint(0, 11, (batch, steps))
            if self.tokens
            else torch.randn(batch, steps, 3, dtype=torch.float64)
        )
        first = self.lstms[0]
        d = 2 if first.bidirectional else 1
        h_out = first.proj_size or first.hidden_size
        h0 = torch.randn(d * first.num_layers, batch, h_out, dtype=torch.float64)
        c0 = torch.randn(d * first.num_layers, batch, first.hidden_size, dtype=torch.float64)
        return x, (h0, c0)


class Tagger(nn.Module):
    """Embedding -> nn.LSTM on a PackedSequence (unsorted lengths) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 4)
        self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: Tensor, lengths: Tensor, hx: tuple[Tensor, Tensor]) -> list[Tensor]:
        packed = pack_padded_sequence(self.embed(tokens), lengths, True, enforce_sorted=False)
        out, (h, c) = self.lstm(packed, hx)
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.size(1))
        return [self.head(padded), h, c]


class Encoder(nn.Module):
    """Embedding -> nn.LSTM -> Linear over the last state: scriptable before and after."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 4)
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True)
        self.head = nn.Linear(6, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        output, (h, _) = self.lstm(self.embed(tokens))
        return self.head(h[-1]) + output.sum()


class Overriding(nn.LSTM):
    def forward(self, input, hx=None):  # type: ignore[override]
        return super().forward(input * 2, hx)


class Plain(nn.LSTM):
    """A subclass that adds nothing to forward: it converts."""


def double(module: nn.Module) -> nn.Module:
    return module.double()


def assert_same_outputs(expected: list[Tensor], actual: list[Tensor]) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert_close(a, e)


@pytest.mark.parametrize("seed", range(12))
def test_random_stack_computes_what_the_original_computes(seed: int) -> None:
    torch.manual_seed(seed)
    original = double(Stack(random.Random(seed))).train(seed % 2 == 0)
    converted = convert(original)
    assert converted is not original and all(type(m) is nn.LSTM for m in original.lstms)
    for before, after in zip(original.lstms, converted.lstms):
        assert type(after) is LSTM
        assert all(getattr(after, key) == getattr(before, key) for key in CONFIG_KEYS)
    assert [m.training for m in converted.modules()] == [m.training for m in original.modules()]
    for (name, p), (name_c, p_c) in zip(original.named_parameters(), converted.named_parameters()):
        assert name == name_c and p_c is not p and p_c.dtype == torch.float64
        assert p_c.requires_grad == p.requires_grad

    x, hx = original.inputs(batch=3, steps=9)
    expected, actual = original(x, hx), converted(x, hx)
    assert_same_outputs(expected, actual)
    # The same model to train: the same gradients for every parameter.
    sum(t.sum() for t in expected).backward()
    sum(t.sum() for t in actual).backward()
    for p, p_c in zip(original.parameters(), converted.parameters()):
        assert (p.grad is None) == (p_c.grad is None)
        if p.grad is not None:
            assert_close(p_c.grad, p.grad)


@pytest.mark.parametrize("seed", range(3))
def test_state_dict_is_the_originals_and_loads_both_ways(seed: int) -> None:
    torch.manual_seed(seed)
    original = double(Stack(random.Random(seed))).eval()
    converted = convert(original)
    expected, actual = original.state_dict(), converted.state_dict()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)

    x, hx = original.inputs(batch=2, steps=6)
    torch.manual_seed(seed + 100)  # the same architecture, other weights
    fresh = double(Stack(random.Random(seed))).eval()
    fresh.load_state_dict(converted.state_dict())
    assert_same_outputs(original(x, hx), fresh(x, hx))
    torch.manual_seed(seed + 200)
    other = double(Stack(random.Random(seed))).eval()
    converted.load_state_dict(other.state_dict())
    assert_same_outputs(other(x, hx), converted(x, hx))


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(batch_first: bool) -> None:
    original = nn.Module()
    original.rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first)
    original.double()
    converted = convert(original)
    x = torch.randn(7, 3, dtype=torch.float64)
    hx = (torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64))
    out, (h, c) = original.rnn(x, hx)
    out_c, (h_c, c_c) = converted.rnn(x, hx)
    assert_same_outputs([out, h, c], [out_c, h_c, c_c])


def test_packed_sequence_through_a_module_that_packs() -> None:
    original = double(Tagger()).eval()
    converted = convert(original)
    tokens = torch.randint(0, 13, (5, 8))
    lengths = torch.tensor([3, 8, 1, 6, 6])  # unsorted, with a tie
    hx = (torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 5, dtype=torch.float64))
    assert_same_outputs(original(tokens, lengths, hx), converted(tokens, lengths, hx))


def test_converted_module_scripts() -> None:
    original = double(Encoder()).eval()
    converted = convert(original)
    assert type(converted.lstm) is LSTM
    scripted = torch.jit.script(converted)
    for batch, steps in ((1, 1), (4, 11)):
        tokens = torch.randint(0, 13, (steps, batch))
        assert_close(scripted(tokens), original(tokens))


def test_inplace_replaces_inside_the_module_and_keeps_its_parameters() -> None:
    module = Encoder()
    optimizer_params = list(module.parameters())  # what an optimizer made before would hold
    assert convert(module, inplace=True) is module
    assert type(module.lstm) is LSTM
    assert all(a is b for a, b in zip(module.parameters(), optimizer_params, strict=True))


def test_copy_leaves_the_original_alone() -> None:
    module = Encoder()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    converted = convert(module)
    assert type(module.lstm) is nn.LSTM and type(converted.lstm) is LSTM
    assert not {id(p) for p in module.parameters()} & {id(p) for p in converted.parameters()}
    with torch.no_grad():
        converted.lstm.weight_ih_l0.add_(1.0)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_an_lstm_itself_converts() -> None:
    original = nn.LSTM(3, 4, proj_size=2, batch_first=True).double()
    converted = convert(original)
    assert type(converted) is LSTM and type(original) is nn.LSTM
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    out, (h, c) = original(x)
    out_c, (h_c, c_c) = converted(x)
    assert_same_outputs([out, h, c], [out_c, h_c, c_c])
    shared = convert(original, inplace=True)
    assert shared.weight_hr_l0 is original.weight_hr_l0


def test_a_shared_lstm_stays_one_shared_lstm() -> None:
    lstm = nn.LSTM(3, 4)
    original = nn.Module()
    original.a = lstm
    original.b = lstm
    original.pair = nn.ModuleList([lstm, lstm])  # twice in one parent
    converted = convert(original)
    assert type(converted.a) is LSTM
    assert converted.a is converted.b is converted.pair[0] is converted.pair[1]
    assert list(converted.state_dict()) == list(original.state_dict())


def test_device_dtype_and_mode_are_kept() -> None:
    original = nn.Module()
    original.rnn = nn.LSTM(3, 4, num_layers=2, dropout=0.3, device="meta", dtype=torch.float16)
    original.eval()
    original.rnn.train()
    converted = convert(original)
    assert {(p.device.type, p.dtype) for p in converted.parameters()} == {("meta", torch.float16)}
    assert converted.rnn.training and not converted.training and converted.rnn.dropout == 0.3


def test_dropout_with_one_layer_warns_once_not_again_on_conversion() -> None:
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        original = nn.LSTM(3, 4, dropout=0.5)
    assert convert(original).dropout == 0.5  # and no warning (the suite's warnings are errors)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_module_converts_on_cuda() -> None:
    original = Encoder().cuda().eval()  # cuDNN's flattened weights
    converted = convert(original)
    assert {p.device.type for p in converted.parameters()} == {"cuda"}
    tokens = torch.randint(0, 13, (9, 3), device="cuda")
    assert_close(converted(tokens), original(tokens), atol=1e-5, rtol=1e-5)


def test_hooks_are_carried() -> None:
    seen: list[tuple[nn.Module, Tensor]] = []
    original = Encoder().double().eval()
    handle = original.lstm.register_forward_hook(lambda m, args, out: seen.append((m, out[0])))
    converted = convert(original)
    tokens = torch.randint(0, 13, (6, 2))
    original(tokens)
    converted(tokens)
    assert [m for m, _ in seen] == [original.lstm, converted.lstm]
    assert_close(seen[1][1], seen[0][1])

    convert(original, inplace=True)
    handle.remove()  # the user's handle still reaches the hook on the converted LSTM
    original(tokens)
    assert len(seen) == 2


def test_a_subclass_that_does_not_override_forward_converts() -> None:
    original = nn.Sequential()
    original.add_module("enc", Plain(3, 4, bidirectional=True).double())
    converted = convert(original)
    assert type(converted.enc) is LSTM
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    assert_close(converted.enc(x)[0], original.enc(x)[0])


def _nested(lstm: nn.LSTM) -> nn.Module:
    outer = nn.Module()
    outer.ok = nn.LSTM(3, 4)
    outer.encoder = nn.Module()
    outer.encoder.rnn = lstm
    return outer


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: Overriding(3, 4), "Overriding overrides forward, which convert cannot carry over; subclass lstm_deploy.LSTM"),
        (lambda: torch.nn.utils.parametrizations.weight_norm(nn.LSTM(3, 4), "weight_hh_l0"),
         r"its weights are parametrized \(weight_hh_l0\); remove the parametrizations first"),
        (lambda: torch.nn.utils.prune.random_unstructured(nn.LSTM(3, 4), "weight_ih_l0", 0.5),
         "its state differs from torch.nn.LSTM's weights in weight_ih_l0, weight_ih_l0_mask, weight_ih_l0_orig; if pruning"),
    ],
    ids=["overrides-forward", "parametrized", "pruned"],
)  # fmt: skip
def test_what_cannot_be_carried_is_refused_by_name(make, reason: str) -> None:
    module = _nested(make())
    with pytest.raises(ConversionError, match=f"^cannot convert 'encoder.rnn': {reason}"):
        convert(module, inplace=True)
    assert type(module.ok) is nn.LSTM  # refused before anything changed
    assert issubclass(ConversionError, ValueError)


def test_refusals_of_the_module_itself() -> None:
    with pytest.raises(ConversionError, match=r"^cannot convert the module itself: Overriding"):
        convert(Overriding(3, 4))
    with pytest.raises(ConversionError, match=r"^cannot convert a TorchScript module: convert"):
        convert(torch.jit.script(Encoder()))


def test_other_recurrent_modules_are_left_alone_with_one_warning() -> None:
    original = nn.Module()
    original.enc = nn.LSTM(3, 4)
    original.dec = nn.GRU(4, 4)
    original.rnn = nn.RNN(4, 4)
    original.cells = nn.ModuleList([nn.LSTMCell(4, 4), nn.GRUCell(4, 4), nn.RNNCell(4, 4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(original)
    assert [str(w.message) for w in caught] == [
        "lstm_deploy.convert left 5 recurrent modules as they are (it converts torch.nn.LSTM "
        "only): dec (GRU), rnn (RNN), cells.0 (LSTMCell), cells.1 (GRUCell), cells.2 (RNNCell)"
    ]
    assert caught[0].category is UserWarning and caught[0].filename == __file__
    assert type(converted.enc) is LSTM and type(converted.dec) is nn.GRU
    assert [type(c) for c in converted.cells] == [nn.LSTMCell, nn.GRUCell, nn.RNNCell]


def test_nothing_to_convert_warns_and_still_copies() -> None:
    module = nn.Sequential(nn.Linear(3, 4))
    with pytest.warns(
        UserWarning, match="^lstm_deploy.convert found no torch.nn.LSTM in Sequential"
    ):
        copied = convert(module)
    assert copied is not module and type(copied[0]) is nn.Linear
    converted = convert(Encoder())
    assert convert(converted).lstm is not converted.lstm  # already ours: no warning


def test_docstring_example_runs() -> None:
    result = doctest.testmod(lstm_deploy._convert)
    assert result.attempted > 0 and result.failed == 0


def test_code_that_calls_flatten_parameters_runs_and_scripts() -> None:
    class Flattening(nn.Module):  # common in models trained on cuDNN
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.lstm.flatten_parameters()
            return self.lstm(x)[0]

    original = Flattening()
    converted = convert(original)
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(converted(x), original(x))
    torch.testing.assert_close(torch.jit.script(converted)(x), original(x))
