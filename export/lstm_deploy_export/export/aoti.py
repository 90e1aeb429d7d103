"""`model.pt2`: the scratch LSTM through torch.export and AOTInductor, for LibTorch's successor.

TorchScript is deprecated; PyTorch's way to run a model from C++ is now `torch.export` plus
AOTInductor: `aoti_compile_and_package` compiles the exported graph into a `.pt2` package (a
shared library of generated C++ kernels, and the weights), which C++ loads with
`torch::inductor::AOTIModelPackageLoader` and Python with `torch._inductor.aoti_load_package`.
The package is compiled for this machine's CPU (Inductor's vector ISA); it runs on the CPU only.

`AotiLSTM` is the graph that gets exported, built from the model's weights; its time loop is the
`scan` higher-order op, which Inductor lowers to a C++ `while` loop that writes each step's output
rows into buffers made once, in place (the loop carries them, marked mutated). A hand-written
`while_loop` that writes into a captured buffer exports too, but Inductor does not record that
mutation: the loop is dropped when nothing reads its outputs, and a read of the buffer after the
loop can be scheduled before it (seen: wrong h_n). The graph's shape is measured, not guessed
(README "Performance"):

- the input projection of all steps is one GEMM per layer and direction, before the loop, with
  the weights transposed once at export (x @ W_ih^T with W_ih^T stored (I, 4H): MKL's fastest
  layout); the loop runs the rest: one h @ W_hh^T GEMM (+ one for the projection) and one fused
  pointwise kernel per step and direction, which adds the step's input projection and the bias
  (as an addmm, MKL would first copy them into its output: one more pass a step);
- time-major inside (T, B, ...): the input is copied time-major once, so that each layer's
  projection is one GEMM and a step's slice of it is contiguous (batch-first, its B rows lie T
  steps apart: a cache and TLB miss each at large B); `output` is a batch-first view;
- both directions of a layer in one loop: the reverse one scans its projection flipped in time;
- tanh(x) as 2 sigmoid(2x) - 1: Inductor's tanh is Sleef's, much slower than its exp;
- the recurrent weights copied once a call into aligned memory (`_fresh`);
- variable lengths masked per step with `where` (fused into the kernel, no extra pass): a padded
  step keeps (h, c) and writes 0, so the state stops at each sequence's last valid step, and the
  reverse direction, which meets the padding first, starts at step length - 1 from (h0, c0).

Inductor's scan lowering needs every shape symbol of the step's outputs among the scan's inputs;
the step names the batch size once (a view), which makes it one. Without it compiling fails with
a KeyError on the batch symbol: scan's failure "with dynamic shapes".
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch._higher_order_ops.scan import scan

from lstm_deploy.bundle import AOTI, BATCH, SEQUENCE, lstm_signature
from lstm_deploy.model import LSTM
from lstm_deploy.versions import package_version
from lstm_deploy_export.export.exporters import example_inputs
from lstm_deploy_export.export.graphs import ExportError

__all__ = ["AotiLSTM", "compiler_unavailable", "export_aoti", "load_aoti", "reason_to_skip"]


def _tanh(x: Tensor) -> Tensor:
    return 2.0 * torch.sigmoid(2.0 * x) - 1.0  # Inductor: one exp, where tanh is a Sleef call


def _fresh(w: Tensor | None, lengths: Tensor) -> Tensor | None:
    """`w` copied into a buffer of this call, 64-byte aligned, for the GEMMs of every step.

    AOTInductor keeps its constants in one malloc'd blob whose start glibc aligns to 16 bytes,
    so every weight sits 16 bytes off a cache line, and MKL's GEMV and small-batch GEMM read it
    unpacked: 10-35% slower a step (measured at hidden 256). One copy a call is cheaper from a
    few steps on. Adding a zero made from an input is what makes the copy: Inductor drops a
    clone of a constant, and folds arithmetic on constants alone (lengths, being integers,
    cannot make the zero a NaN).
    """
    if w is None:
        return None
    return w + (lengths[:1] * 0).to(w.dtype)


def _cell(
    h: Tensor,
    c: Tensor,
    xw: Tensor,
    valid: Tensor,
    w_hh_t: Tensor,
    bias: Tensor | None,
    w_hr_t: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of one direction: (h, c) after it, and its output (0 at a padded step).

    xw (B, 4H): the step's input projection; valid (B, 1): whether the step is within length.
    The gate blocks are split before the adds, so that Inductor fuses the adds into the pointwise
    kernel instead of turning mm + xw into an addmm.
    """
    parts = (bias.chunk(4),) if bias is not None else ()
    blocks = zip(torch.mm(h, w_hh_t).chunk(4, 1), xw.chunk(4, 1), *parts)
    i, f, g, o = (sum(block[1:], block[0]) for block in blocks)  # (B, H) each
    c = torch.where(valid, torch.sigmoid(f) * c + torch.sigmoid(i) * _tanh(g), c)
    h_new = torch.sigmoid(o) * _tanh(c)
    if w_hr_t is not None:
        h_new = torch.mm(h_new, w_hr_t)  # (B, proj_size)
    h = torch.where(valid, h_new, h)
    return h, c, torch.where(valid, h, 0.0)


class AotiLSTM(nn.Module):
    """The graph of model.pt2: the deployed signature (batch first), the model's weights inside.

    Not meant to run eagerly (scan would compile it): it is exported, then compiled.
    """

    def __init__(self, model: LSTM) -> None:
        super().__init__()
        self.num_layers = model.num_layers
        self.num_directions = 2 if model.bidirectional else 1
        self.proj = model.proj_size > 0
        self.bias = model.bias
        for k in range(self.num_layers * self.num_directions):
            self._constant(f"w_ih_t_{k}", model._w_ih[k].t())  # (I_l, 4H)
            self._constant(f"w_hh_t_{k}", model._w_hh[k].t())  # (H_out, 4H)
            if model.bias:
                self._constant(f"b_{k}", model._b_ih[k] + model._b_hh[k])  # (4H,)
            if self.proj:
                self._constant(f"w_hr_t_{k}", model._w_hr[k].t())  # (H, proj_size)

    def _constant(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value.detach().to("cpu", torch.float32).contiguous().clone())

    def _weights(self, kind: str, ks: Sequence[int]) -> list[Tensor | None]:
        present = {"b": self.bias, "w_hr_t": self.proj}.get(kind, True)
        return [getattr(self, f"{kind}_{k}") if present else None for k in ks]

    def forward(
        self, input: Tensor, lengths: Tensor, h0: Tensor, c0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        d = self.num_directions
        batch, steps = input.shape[0], input.shape[1]
        # Copied time-major once: then each layer's input projection is one mm over all T * B
        # rows (matmul of the transposed view would be a bmm: T GEMVs at batch 1).
        x = input.transpose(0, 1).contiguous()  # (T, B, I)
        t = torch.arange(steps, device=input.device).unsqueeze(1)  # (T, 1)
        valid = (t < lengths).unsqueeze(2)  # (T, B, 1)
        valids = [valid, valid.flip(0)][:d]
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(self.num_layers):
            ks = [layer * d + j for j in range(d)]
            w_ih_t: list[Tensor] = [getattr(self, f"w_ih_t_{k}") for k in ks]
            w_hh_t = [_fresh(w, lengths) for w in self._weights("w_hh_t", ks)]
            w_hr_t = [_fresh(w, lengths) for w in self._weights("w_hr_t", ks)]
            biases = self._weights("b", ks)
            xws = [torch.matmul(x, w) for w in w_ih_t]  # (T, B, 4H) each
            if d == 2:
                xws[1] = xws[1].flip(0)  # the reverse direction runs forward over time flipped
            init = tuple(s[:, k].contiguous() for k in ks for s in (h0, c0))
            xs = tuple(v for pair in zip(xws, valids) for v in pair)

            def step(
                carry: tuple[Tensor, ...],
                xs: tuple[Tensor, ...],
                w_hh_t: list[Tensor | None] = w_hh_t,
                biases: list[Tensor | None] = biases,
                w_hr_t: list[Tensor | None] = w_hr_t,
                batch: Any = batch,
            ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
                # Names the batch size inside the step (see the module's docstring).
                carry = (carry[0].view(batch, -1), *carry[1:])
                state: list[Tensor] = []
                outputs: list[Tensor] = []
                for j in range(d):
                    w = w_hh_t[j]
                    assert w is not None
                    h, c, y = _cell(
                        carry[2 * j], carry[2 * j + 1], xs[2 * j], xs[2 * j + 1], w,
                        biases[j], w_hr_t[j],
                    )  # fmt: skip
                    state += [h, c]
                    outputs.append(y)
                return tuple(state), tuple(outputs)

            final, ys = scan(step, init, xs)  # ys: (T, B, H_out) per direction
            h_n += final[0::2]
            c_n += final[1::2]
            x = ys[0] if d == 1 else torch.cat([ys[0], ys[1].flip(0)], 2)  # (T, B, D * H_out)
        # A batch-first view, as model.pt returns: a copy would cost a pass over the output.
        return x.transpose(0, 1), torch.stack(h_n, 1), torch.stack(c_n, 1)


# --- export, compile, load ------------------------------------------------------------------


def compiler_unavailable() -> str | None:
    """Why AOTInductor cannot compile here, or None: Inductor's own search for a C++ compiler."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        searched = [c for c in torch._inductor.config.cpp.cxx if c]
        return (
            f"{AOTI} needs a C++ compiler for AOTInductor and none was found (searched: "
            f"{', '.join(searched)}); install g++ or set CXX, then export again"
        )
    return None


# The oldest torch whose AOTInductor compiles the scan loop: torch 2.11's fails in its C++ wrapper
# (`codegen_while_loop`: an AssertionError on the subgraph's inputs), found on the GPU machine.
MIN_TORCH = (2, 13)


def torch_unsupported() -> str | None:
    """Why this torch cannot compile model.pt2, or None."""
    found = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        return (
            f"{AOTI} needs torch >= {need} (torch {torch.__version__}'s AOTInductor cannot "
            f"compile its scan loop); pip install 'torch>={need}' to export it"
        )
    return None


SKIP_ENV = "LSTM_DEPLOY_SKIP_PT2"  # set: default exports leave model.pt2 out (the test suite does)


def reason_to_skip(requested: bool) -> str | None:
    """Why this export leaves model.pt2 out, or None to compile it.

    Args:
        requested: model.pt2 was named (`--artifacts ...,aoti`), not only implied by the default.

    Raises:
        ExportError: it was named and this torch or machine cannot compile it.
    """
    reason = torch_unsupported() or compiler_unavailable()
    if reason is not None and requested:
        raise ExportError(reason)
    if reason is None and not requested and os.environ.get(SKIP_ENV):
        reason = (
            f"left out of the default artifacts: {SKIP_ENV} is set (it saves the C++ compile; "
            "--artifacts with aoti compiles it)"
        )
    return reason


def compile_seconds(model: LSTM) -> int:
    """A rough compile time on 2 cores, for the progress line (measured: 11-15 s for one layer,
    20-33 s for two bidirectional ones; most of it Inductor's code generation and g++)."""
    loops = model.num_layers  # one loop a layer, both directions in it
    return 5 + 6 * loops * (2 if model.bidirectional else 1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch.export and AOTInductor warn about their own internals (pytree's LeafSpec deprecation
    # as they pickle tree specs, TorchScript's deprecation as Inductor imports torch.utils.mkldnn):
    # nothing a user of this package can act on. As exporters._quiet_exporter does for ONNX.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_aoti(
    model: LSTM, path: str | Path, progress: Callable[[str], None] | None = None
) -> Path:
    """`model.pt2`: `AotiLSTM(model)` exported with dynamic batch and sequence, then compiled and
    packaged by AOTInductor. Call `compiler_unavailable()` first: without a C++ compiler Inductor
    fails deep inside."""
    say = progress or (lambda _: None)
    sig = lstm_signature(model.config)
    # min=1: the range a Dim gets from the example (batch 2) starts at 2, and AOTInductor may
    # then assume a size is not 1 (its input checks, when on, refuse batch 1).
    dims = {name: torch.export.Dim(name, min=1) for name in (BATCH, SEQUENCE)}
    dynamic = {
        t.name: {i: dims[s] for i, s in enumerate(t.shape) if isinstance(s, str)}
        for t in sig.inputs
    }
    module = AotiLSTM(model).eval()  # float32 on the CPU, whatever the model's dtype and device
    example = tuple(t.float() if t.is_floating_point() else t for t in example_inputs(model))
    say(f"exporting {AOTI} (torch.export)")
    started = time.monotonic()
    with _quiet(), torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=dynamic)
        say(f"compiling {AOTI} with AOTInductor (~{compile_seconds(model)} s)")
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(path),
            inductor_configs={"aot_inductor.metadata": package_metadata(model)},
        )
    say(f"compiled {AOTI} in {time.monotonic() - started:.0f} s")
    return Path(path)


def package_metadata(model: LSTM) -> dict[str, str]:
    """What the package says about itself, for C++ (`AOTIModelPackageLoader::get_metadata`).

    `lstm_deploy.inputs`: each input's name and shape, -1 for a dynamic axis, e.g.
    "input:-1,-1,32;lengths:-1;h0:-1,2,64;c0:-1,2,64". The compiled code does not check its
    inputs' sizes (AOTInductor's checks are off unless AOTI_RUNTIME_CHECK_INPUTS=1): the C++
    program checks them against this before a run, and names the mismatch.
    """
    sig = lstm_signature(model.config)
    shapes = (f"{t.name}:{','.join(map(str, t.wire_shape))}" for t in sig.inputs)
    return {"lstm_deploy.version": package_version(), "lstm_deploy.inputs": ";".join(shapes)}


def load_aoti(path: str | Path) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    """model.pt2 loaded for Python: a call from the signature's inputs (in order) to its outputs.

    The call checks the inputs' shapes against the package's metadata (the compiled code trusts
    them), then calls the package's loader directly: `aoti_load_package`'s model object re-reads
    its pytree specs on every call (~30 us), which bench would otherwise time.

    Raises:
        ValueError: not an lstm-deploy model.pt2 (its metadata has no input shapes); from the
            call, an input whose shape the package does not take.
    """
    with _quiet():
        compiled = torch._inductor.aoti_load_package(str(path))
    shapes = declared_shapes(compiled.get_metadata(), str(path))
    run = compiled.loader.run

    def call(inputs: Sequence[Tensor]) -> list[Tensor]:
        for t, (name, shape) in zip(inputs, shapes, strict=True):
            if t.dim() != len(shape) or any(d >= 0 and d != n for d, n in zip(shape, t.shape)):
                wanted = ", ".join(str(d) if d >= 0 else "-1" for d in shape)
                raise ValueError(
                    f"{path}: input {name} has shape {list(t.shape)}, the package takes "
                    f"[{wanted}] (-1: any size)"
                )
        outputs: list[Tensor] = run(list(inputs))
        return outputs

    return call


def declared_shapes(metadata: dict[str, str], where: str) -> list[tuple[str, list[int]]]:
    """The input shapes of `package_metadata`, in signature order; ValueError without them."""
    text = metadata.get("lstm_deploy.inputs")
    if not text:
        raise ValueError(
            f"{where}: no lstm_deploy.inputs in its metadata; not an lstm-deploy {AOTI}"
        )
    shapes = []
    for entry in text.split(";"):
        name, dims = entry.split(":")
        shapes.append((name, [int(d) for d in dims.split(",")]))
    return shapes
