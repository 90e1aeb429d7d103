"""`convert`: every torch.nn.LSTM in a user's module becomes a `lstm_deploy.LSTM`.

A model written with nn.LSTM (a tagger, an encoder) becomes scriptable and exportable without
editing its code. Each converted LSTM takes over the nn.LSTM's configuration, its Parameter
objects (so state_dict keys and values, device, dtype, requires_grad, tied weights and an
optimizer's references all carry over), its training mode and its hooks. What cannot be carried,
convert refuses by name before it changes anything; the recurrent modules it does not convert
(GRU, RNN, the cells) it leaves alone and names in one warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import TypeVar, overload

import torch
from torch import nn
from torch.nn.utils import parametrize

from lstm_deploy.config import LSTMConfig
from lstm_deploy.model import LSTM

__all__ = ["ConversionError", "convert", "replace_modules"]

M = TypeVar("M", bound=nn.Module)
T = TypeVar("T", bound=nn.Module)

_LEFT_ALONE = (nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
# Every per-module hook table nn.Module keeps (forward, backward, state_dict), read from nn.Module
# itself rather than listed, so that a torch release adding one cannot leave it behind.
_HOOKS = tuple(name for name in vars(nn.Module()) if "hook" in name)


class ConversionError(ValueError):
    """A submodule that `convert` cannot replace: the message names it, the reason and the fix."""


@overload
def convert(module: nn.LSTM, inplace: bool = False) -> LSTM: ...
@overload
def convert(module: M, inplace: bool = False) -> M: ...
def convert(module: nn.Module, inplace: bool = False) -> nn.Module:
    """`module` with every torch.nn.LSTM in its tree replaced by a `lstm_deploy.LSTM`.

    Each replacement has the nn.LSTM's constructor arguments and takes over its parameters (the
    same Parameter objects), hooks and training mode, so the module computes what it computed,
    with the same state_dict, including on unbatched, batch_first and (in eager mode)
    PackedSequence inputs. An nn.LSTM registered under several names becomes one LSTM, shared as
    before. A subclass of nn.LSTM that does not override `forward` converts to a plain LSTM.
    GRU, RNN, LSTMCell, GRUCell and RNNCell stay as they are, named in one UserWarning; a module
    with no LSTM at all gets a short UserWarning too.

    Args:
        module: any torch.nn.Module, or a torch.nn.LSTM itself.
        inplace: if False, convert a deep copy and leave `module` untouched; if True, replace
            the LSTMs inside `module` itself (an optimizer made before keeps working: the
            parameters are the same objects). Default: False

    Returns:
        The converted module: the copy, or `module` itself with inplace=True. For a torch.nn.LSTM,
        the `lstm_deploy.LSTM` that replaces it.

    Raises:
        ConversionError: (a ValueError) before anything is changed, for a TorchScript module and
            for an nn.LSTM that cannot be carried over: a subclass overriding `forward`, weights
            under a parametrization, or state that nn.LSTM does not have (pruning, old-style
            weight_norm). The message names the submodule, the reason and the fix.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import lstm_deploy
        >>> class Tagger(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.embed = nn.Embedding(100, 16)
        ...         self.lstm = nn.LSTM(16, 32, batch_first=True, bidirectional=True)
        ...         self.head = nn.Linear(64, 5)
        ...
        ...     def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ...         return self.head(self.lstm(self.embed(tokens))[0])
        >>> tagger = Tagger().eval()
        >>> converted = lstm_deploy.convert(tagger)
        >>> converted.lstm
        LSTM(16, 32, batch_first=True, bidirectional=True)
        >>> tokens = torch.randint(0, 100, (3, 7))
        >>> torch.allclose(converted(tokens), tagger(tokens), atol=1e-6)
        True
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise ConversionError(
            "cannot convert a TorchScript module: convert the eager module, then script it"
        )
    lstms, left_alone, has_ours = _survey(module)
    if left_alone:
        n = len(left_alone)
        what = f"{n} recurrent modules as they are" if n > 1 else "1 recurrent module as it is"
        warnings.warn(
            f"lstm_deploy.convert left {what} (it converts torch.nn.LSTM only): "
            + ", ".join(left_alone),
            UserWarning,
            stacklevel=2,
        )
    elif not lstms and not has_ours:
        warnings.warn(
            f"lstm_deploy.convert found no torch.nn.LSTM in {type(module).__name__}: "
            "nothing converted",
            UserWarning,
            stacklevel=2,
        )
    root = module if inplace else copy.deepcopy(module)
    return replace_modules(root, nn.LSTM, _replacement)[0]


def replace_modules(
    root: nn.Module, kind: type[T], make: Callable[[T], nn.Module]
) -> tuple[nn.Module, dict[T, nn.Module]]:
    """Replace, in place, every module of type `kind` in `root`'s tree by `make(module)`.

    One replacement per instance, put in each of its places: a module registered under several
    names (in one parent or in several) stays one module. Places are visited in `named_modules`
    order (depth first, as registered). Returns the new root (`make(root)` where `root` is of
    `kind`) and {replaced: its replacement}, in that order.
    """
    done: dict[T, nn.Module] = {}
    # remove_duplicate=False: every place of a shared module, its second name in one parent too.
    for path, module in list(root.named_modules(remove_duplicate=False)):
        if not isinstance(module, kind):
            continue
        if module not in done:
            done[module] = make(module)
        if not path:
            return done[module], done
        parent, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, name, done[module])
    return root, done


def _survey(module: nn.Module) -> tuple[list[str], list[str], bool]:
    """The names of the nn.LSTMs to convert, the modules left alone, whether ours are there.

    Raises ConversionError for the first nn.LSTM that cannot be converted.
    """
    lstms: list[str] = []
    left_alone: list[str] = []
    has_ours = False
    for name, m in module.named_modules():
        where = f"'{name}'" if name else "the module itself"
        if isinstance(m, nn.LSTM):
            reason = _refusal(m)
            if reason is not None:
                raise ConversionError(f"cannot convert {where}: {reason}")
            lstms.append(name)
        elif isinstance(m, _LEFT_ALONE):
            left_alone.append(f"{name or 'the module itself'} ({type(m).__name__})")
        has_ours = has_ours or isinstance(m, LSTM)
    return lstms, left_alone, has_ours


def _refusal(lstm: nn.LSTM) -> str | None:
    """Why `lstm` cannot be replaced by a lstm_deploy.LSTM that computes the same, or None."""
    if parametrize.is_parametrized(lstm):
        weights = _blank(lstm).state_dict()
        names = ", ".join(n for n in weights if parametrize.is_parametrized(lstm, n))
        return (
            f"its weights are parametrized ({names}); remove the parametrizations first: "
            "torch.nn.utils.parametrize.remove_parametrizations(module, name)"
        )
    cls = type(lstm)
    if cls.forward is not nn.LSTM.forward:
        return (
            f"{cls.__name__} overrides forward, which convert cannot carry over; subclass "
            "lstm_deploy.LSTM with that forward instead (it loads the same state_dict)"
        )
    expected = set(_blank(lstm).state_dict())
    state = set(lstm.state_dict())
    params = {name for name, _ in lstm.named_parameters(recurse=False)}
    if state != expected or params != expected:
        differ = ", ".join(sorted((state | params) ^ expected))
        return (
            f"its state differs from torch.nn.LSTM's weights in {differ}; if pruning or "
            "weight_norm made it, make that permanent first (torch.nn.utils.prune.remove, "
            "torch.nn.utils.remove_weight_norm)"
        )
    return None


def _blank(lstm: nn.LSTM) -> LSTM:
    """A lstm_deploy.LSTM configured as `lstm`, its weights on the meta device (no memory)."""
    config = LSTMConfig(**{key: getattr(lstm, key) for key in LSTMConfig.__dataclass_fields__})
    with warnings.catch_warnings():
        # nn.LSTM warned about dropout with one layer when it was built: once is enough.
        warnings.simplefilter("ignore", UserWarning)
        return LSTM.from_config(config, device="meta")


def _replacement(lstm: nn.LSTM) -> LSTM:
    """The lstm_deploy.LSTM that takes over `lstm`'s parameters, hooks and training mode."""
    new = _blank(lstm)
    for name, param in lstm.named_parameters(recurse=False):
        setattr(new, name, param)
    # The same hook tables: a handle from lstm.register_forward_hook still removes its hook.
    for name in _HOOKS:
        setattr(new, name, getattr(lstm, name))
    return new.train(lstm.training)
