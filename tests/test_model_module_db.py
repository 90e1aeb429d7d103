"""lstm_deploy.LSTM judged by PyTorch's own module tests: module_db's torch.nn.LSTM entry, and more.

module_db (torch.testing._internal.common_modules) holds the samples that PyTorch's test_modules.py
runs every module through. For each of its torch.nn.LSTM samples (float32 and float64, CPU, eval and
train), ours must return what nn.LSTM returns with the same weights, eager and scripted, and raise
the exception type nn.LSTM raises, matching the same pattern, for each error sample. The tables
after it hold what module_db does not: argument types, the dropout warning, empty sequences, dtype,
device and state mismatches (against nn.LSTM), and bad lengths (against pack_padded_sequence).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lstm_deploy import LSTM


def _import_common_modules() -> Any:
    """torch.testing._internal.common_modules, without what importing it does to the session.

    Its import (through common_utils) sets the process up for PyTorch's own suite: it freezes
    torch.backends' flags (tests/test_validate.py sets TF32 flags, which would then raise) and
    wraps every TorchScript call. Neither is let through, so that other tests run as without this
    file. No importorskip: without expecttest or hypothesis this file must fail, not pass empty.
    """
    script_function, script_method = torch._C.ScriptFunction, torch._C.ScriptMethod
    with (
        mock.patch.object(torch.backends, "disable_global_flags", lambda: None),
        mock.patch.object(script_function, "__call__", script_function.__call__),
        mock.patch.object(script_method, "__call__", script_method.__call__),
    ):
        from torch.testing._internal import common_modules
    return common_modules


common_modules = _import_common_modules()
(INFO,) = [info for info in common_modules.module_db if info.module_cls is nn.LSTM]
DTYPES = {"f32": torch.float32, "f64": torch.float64}
CONSTRUCTION = common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR


def forward_samples(dtype: torch.dtype, training: bool) -> list:
    # requires_grad in training: the differentiable time loop runs there, the no-grad one in eval.
    return INFO.module_inputs_func(
        INFO, device="cpu", dtype=dtype, requires_grad=training, training=training
    )


def error_samples(dtype: torch.dtype) -> list:
    return INFO.module_error_inputs_func(
        INFO, device="cpu", dtype=dtype, requires_grad=False, training=False
    )


def _call_id(name: str, function_input: Any) -> str:
    args = [repr(a) for a in function_input.args]
    args += [f"{k}={v!r}" for k, v in function_input.kwargs.items()]
    return f"{name}({', '.join(args)})"


FORWARD_CASES = [
    pytest.param(
        dtype,
        training,
        index,
        id=f"{key}-{'train' if training else 'eval'}-{_call_id('LSTM', s.constructor_input)}"
        + ("-hx" if len(s.forward_input.args) > 1 else ""),
    )
    for key, dtype in DTYPES.items()
    for training in (False, True)
    for index, s in enumerate(forward_samples(dtype, training))
]
ERROR_CASES = [
    pytest.param(
        dtype,
        index,
        id=f"{key}-{'construct' if s.error_on == CONSTRUCTION else 'forward'}-"
        + _call_id("LSTM", s.module_error_input.constructor_input),
    )
    for key, dtype in DTYPES.items()
    for index, s in enumerate(error_samples(dtype))
]


def test_module_db_holds_the_lstm_samples() -> None:
    # A check that cannot fail proves nothing: the tables below hold module_db's 2 x 2 x 32 forward
    # samples (or more) and its 2 x 14 error samples (or more), some of them forward errors.
    assert len(FORWARD_CASES) >= 128 and len(ERROR_CASES) >= 28
    assert any(s.error_on != CONSTRUCTION for s in error_samples(torch.float32))


def make_pair(args: tuple, kwargs: dict, dtype: torch.dtype | None = None) -> tuple[nn.LSTM, LSTM]:
    """nn.LSTM and ours built from the same arguments, ours with nn.LSTM's weights."""
    ref, model = nn.LSTM(*args, **kwargs), LSTM(*args, **kwargs)
    if dtype is not None:
        ref, model = ref.to(dtype), model.to(dtype)  # as test_modules.py does: build, then .to()
    model.load_state_dict(ref.state_dict())
    return ref, model


def leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, PackedSequence):
        return [x.data]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, tuple | list):
        return [t for item in x for t in leaves(item)]
    return [x] if isinstance(x, torch.Tensor) else []


def assert_same(actual: Any, expected: Any) -> None:
    """Outputs equal within the dtype's default tolerance; a PackedSequence's packing exactly."""
    (out, (h, c)), (rout, (rh, rc)) = actual, expected
    if isinstance(rout, PackedSequence):
        assert isinstance(out, PackedSequence), f"output: {type(out).__name__}, not PackedSequence"
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, e = getattr(out, name), getattr(rout, name)
            assert (a is None and e is None) or torch.equal(a, e), f"{name}: {a} != {e}"
        out, rout = out.data, rout.data
    for name, a, e in (("output", out, rout), ("h_n", h, rh), ("c_n", c, rc)):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("dtype", "training", "index"), FORWARD_CASES)
def test_forward_matches_torch(dtype: torch.dtype, training: bool, index: int) -> None:
    sample = forward_samples(dtype, training)[index]
    ctor, fwd = sample.constructor_input, sample.forward_input
    ref, model = make_pair(ctor.args, ctor.kwargs, dtype)
    ref.train(training), model.train(training)
    expected = ref(*fwd.args, **fwd.kwargs)
    actual = model(*fwd.args, **fwd.kwargs)
    assert_same(actual, expected)
    if not isinstance(fwd.args[0], PackedSequence):  # the scripted module has lengths= instead
        assert_same(torch.jit.script(model)(*fwd.args, **fwd.kwargs), expected)
    if training:  # the gradients too, of the inputs and of every weight
        inputs = [t for t in leaves((fwd.args, fwd.kwargs)) if t.requires_grad]
        names = [f"forward tensor {i}" for i in range(len(inputs))]
        names += [name for name, _ in model.named_parameters()]
        grads = gradients(actual, [*inputs, *model.parameters()])
        ref_grads = gradients(expected, [*inputs, *ref.parameters()])
        for name, a, e in zip(names, grads, ref_grads, strict=True):
            torch.testing.assert_close(a, e, msg=lambda m, name=name: f"grad of {name}: {m}")


def gradients(outputs: Any, wrt: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(sum(t.sum() for t in leaves(outputs)), wrt)


@pytest.mark.parametrize(("dtype", "index"), ERROR_CASES)
def test_error_matches_torch(dtype: torch.dtype, index: int) -> None:
    sample = error_samples(dtype)[index]
    ctor = sample.module_error_input.constructor_input
    error, pattern = sample.error_type, sample.error_regex
    if sample.error_on == CONSTRUCTION:
        for cls in (nn.LSTM, LSTM):  # nn.LSTM too: module_db's sample is still nn.LSTM's truth
            with pytest.raises(error, match=pattern) as info:
                cls(*ctor.args, **ctor.kwargs)
            assert type(info.value) is error, f"{cls.__name__}: {info.value!r}"
        return
    fwd = sample.module_error_input.forward_input
    ref, model = make_pair(ctor.args, ctor.kwargs)
    for module in (ref, model):
        with pytest.raises(error, match=pattern) as info:
            module(*fwd.args, **fwd.kwargs)
        assert type(info.value) is error, f"{type(module).__name__}: {info.value!r}"
    # TorchScript raises its own type, naming the Python one in the message.
    with pytest.raises(torch.jit.Error, match=rf"builtins\.{error.__name__}: (?:{pattern})"):
        torch.jit.script(model)(*fwd.args, **fwd.kwargs)


def raised(call: Callable[[], Any]) -> BaseException | None:
    """What the call raises (None if nothing), warnings ignored: they are not the errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except Exception as e:
            return e
    return None


# On top of LSTM(3, 5): each argument of a wrong type or value, as nn.LSTM's checks see it.
CONSTRUCTOR_ERRORS = {
    "bias-None": dict(bias=None),
    "bias-float": dict(bias=1.0),
    "batch_first-None": dict(batch_first=None),
    "input_size-None": dict(input_size=None),
    "hidden_size-str": dict(hidden_size="5"),
    "hidden_size-negative": dict(hidden_size=-5),
    "num_layers-str": dict(num_layers="2"),
    "num_layers-float": dict(num_layers=2.0),
    "num_layers-None": dict(num_layers=None),
    "num_layers-negative": dict(num_layers=-1),
    "proj_size-str": dict(proj_size="1"),
    "proj_size-float": dict(proj_size=1.0),
    "proj_size-bool": dict(proj_size=True),
    "proj_size-negative": dict(proj_size=-1),
    "proj_size-not-below-hidden": dict(proj_size=5),
    "dropout-None": dict(dropout=None),
    "dropout-complex": dict(dropout=1j),
    "dropout-list": dict(dropout=[0.1]),
    "dropout-numeric-str": dict(dropout="0.1"),
    "dropout-str": dict(dropout="half"),
    "dropout-bool": dict(dropout=True),
    "dropout-negative": dict(dropout=-0.1, num_layers=2),
    "dropout-above-one": dict(dropout=1.5, num_layers=2),
}


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_ERRORS.values(), ids=CONSTRUCTOR_ERRORS.keys())
def test_constructor_error_type_matches_torch(kwargs: dict) -> None:
    args = dict(input_size=3, hidden_size=5) | kwargs
    expected, actual = raised(lambda: nn.LSTM(**args)), raised(lambda: LSTM(**args))
    assert expected is not None, "nn.LSTM takes it: not an error case"
    assert type(actual) is type(expected), f"{actual!r}; nn.LSTM raises {expected!r}"
    # Ours names the argument, and the actual value or its type.
    name, value = next(iter(kwargs.items()))
    assert name in str(actual), actual
    assert repr(value) in str(actual) or type(value).__name__ in str(actual), actual


@pytest.mark.parametrize("cls", [nn.LSTM, LSTM], ids=["nn.LSTM", "LSTM"])
def test_dropout_with_one_layer_warns_like_torch(cls: type) -> None:
    with pytest.warns(UserWarning, match="dropout=0.5 and num_layers=1") as record:
        cls(3, 5, dropout=0.5)
    assert len(record) == 1
    if cls is LSTM:  # ours points at the caller's line, not into the library
        assert record[0].filename == __file__
    cls(3, 5, num_layers=2, dropout=0.5)  # warnings are errors here: neither of these warns
    cls(3, 5, dropout=0.0)


X = torch.randn(5, 3, 4)
H, C = torch.zeros(4, 3, 8), torch.zeros(4, 3, 8)  # num_layers=2, bidirectional: (4, B, 8)
DEFAULT = dict(num_layers=2, bidirectional=True)
BATCH_FIRST = dict(batch_first=True)


def packed(x: torch.Tensor) -> PackedSequence:
    return pack_padded_sequence(x, torch.tensor([5, 3, 2]), enforce_sorted=False)


# (configuration, call, eager only): nn.LSTM and ours with its weights get the same call.
FORWARD_ERRORS: dict[str, tuple[dict, Callable[[nn.Module], Any], bool]] = {
    "empty-sequence": (DEFAULT, lambda m: m(torch.randn(0, 3, 4)), False),
    "empty-sequence-unbatched": (DEFAULT, lambda m: m(torch.randn(0, 4)), False),
    "empty-sequence-hx": (DEFAULT, lambda m: m(torch.randn(0, 3, 4), (H, C)), False),
    "empty-sequence-and-batch": (DEFAULT, lambda m: m(torch.randn(0, 0, 4)), False),
    "empty-sequence-batch-first": (BATCH_FIRST, lambda m: m(torch.randn(3, 0, 4)), False),
    "integer-input": (DEFAULT, lambda m: m(X.long()), False),
    "float64-input": (DEFAULT, lambda m: m(X.double()), False),
    "float16-input": (DEFAULT, lambda m: m(X.half()), False),
    "float64-unbatched": (DEFAULT, lambda m: m(X[:, 0].double()), False),
    "dtype-before-size": (DEFAULT, lambda m: m(torch.randn(5, 3, 6).double()), False),
    "state-rank-before-dtype": (DEFAULT, lambda m: m(X.long(), (H[:, 0], C[:, 0])), False),
    "rank-1": (DEFAULT, lambda m: m(torch.randn(4)), False),
    "rank-4": (DEFAULT, lambda m: m(torch.randn(2, 5, 3, 4)), False),
    "feature-size": (DEFAULT, lambda m: m(torch.randn(5, 3, 6)), False),
    "h0-shape": (DEFAULT, lambda m: m(X, (torch.zeros(2, 3, 8), C)), False),
    "c0-batch": (DEFAULT, lambda m: m(X, (H, torch.zeros(4, 2, 8))), False),
    "h0-dtype": (DEFAULT, lambda m: m(X, (H.double(), C)), False),
    "c0-dtype": (DEFAULT, lambda m: m(X, (H, C.double())), False),
    "h0-device": (DEFAULT, lambda m: m(X, (H.to("meta"), C)), False),
    "parameters-device": (dict(device="meta"), lambda m: m(torch.randn(2, 1, 4)), False),
    "batched-2d-state": (DEFAULT, lambda m: m(X, (H[:, 0], C[:, 0])), False),
    "unbatched-3d-state": (DEFAULT, lambda m: m(X[:, 0], (H, C)), False),
    "hx-a-tensor": (DEFAULT, lambda m: m(X, H), True),
    # nn.LSTM's PackedSequence path skips its Python checks; its kernel raises RuntimeError.
    "packed-float64": (DEFAULT, lambda m: m(packed(X.double())), True),
    "packed-integer": (DEFAULT, lambda m: m(packed(X.long())), True),
    "packed-feature-size": (DEFAULT, lambda m: m(packed(torch.randn(5, 3, 6))), True),
    "packed-h0-batch": (DEFAULT, lambda m: m(packed(X), (H[:, :2], C[:, :2])), True),
    "packed-h0-layers": (DEFAULT, lambda m: m(packed(X), (H[:2], C[:2])), True),
    "packed-c0-dtype": (DEFAULT, lambda m: m(packed(X), (H, C.double())), True),
}


@pytest.mark.parametrize(
    ("config", "call", "eager_only"), FORWARD_ERRORS.values(), ids=FORWARD_ERRORS.keys()
)
def test_forward_error_type_matches_torch(config: dict, call: Callable, eager_only: bool) -> None:
    ref, model = make_pair((4, 8), config)
    expected, actual = raised(lambda: call(ref)), raised(lambda: call(model))
    assert expected is not None, "nn.LSTM takes it: not an error case"
    assert type(actual) is type(expected), f"{actual!r}; nn.LSTM raises {expected!r}"
    if not eager_only:  # scripted: its own type, naming ours, with our message word for word
        message = rf"builtins\.{type(actual).__name__}: {re.escape(str(actual))}"
        with pytest.raises(torch.jit.Error, match=message):
            call(torch.jit.script(model))


def test_empty_batch_runs_like_torch() -> None:
    ref, model = make_pair((4, 8), DEFAULT)
    x = torch.randn(5, 0, 4)
    assert_same(model(x), ref(x))
    assert_same(model(x, None, torch.zeros(0, dtype=torch.int64)), ref(x))


LENGTHS_ERRORS = {
    "zero": [5, 0, 2],
    "negative": [5, -1, 2],
    "past-T": [5, 6, 2],
    "all-past-T": [7, 7, 7],
}


@pytest.mark.parametrize("lengths", LENGTHS_ERRORS.values(), ids=LENGTHS_ERRORS.keys())
def test_lengths_error_type_matches_pack_padded_sequence(lengths: list[int]) -> None:
    """pack_padded_sequence refuses a length below 1; one past T it packs into a PackedSequence
    that pad_packed_sequence then refuses: the round trip is the reference."""
    lens = torch.tensor(lengths)
    expected = raised(
        lambda: pad_packed_sequence(pack_padded_sequence(X, lens, enforce_sorted=False))
    )
    assert expected is not None
    actual = raised(lambda: LSTM(4, 8)(X, None, lens))
    assert type(actual) is type(expected), f"{actual!r}; pack_padded_sequence: {expected!r}"
