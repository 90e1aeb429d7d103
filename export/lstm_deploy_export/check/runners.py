"""How each runtime runs a bundle's artifact: one maker per kind of runtime, each giving a Runner.

A runner takes the signature's inputs as numpy arrays and returns its outputs as numpy arrays,
whatever runs underneath: the scratch module in eager PyTorch (a whole-model bundle's: the user's
module with its LSTMs converted, behind the signature as export runs it), TorchScript (CPU, CUDA),
ONNX Runtime (CPU, CUDA), OpenVINO, onnx's reference evaluator, torch.nn.LSTM (bench's reference),
the C++ programs of export/cpp, or a real Triton server. `Runner.prepare` does the untimed work
(tensors onto the device) and returns the call that bench times. Which runner runs which row is
the registry's (`runtimes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstm_deploy import convert
from lstm_deploy.bundle import AOTI, INPUT, LENGTHS, TORCHSCRIPT, Bundle, Signature
from lstm_deploy.model import LSTM
from lstm_deploy_export.check import ort_session
from lstm_deploy_export.export.graphs import DeployLSTM
from lstm_deploy_export.export.taps import Flat, flatten, tapped
from lstm_deploy_export.export.writer import load_model

if TYPE_CHECKING:
    from lstm_deploy_export.tools.cpp import CppPrograms

Arrays = dict[str, np.ndarray]


class Unavailable(Exception):
    """Raised while loading a runner whose runtime turns out not to be usable here."""


@dataclass(frozen=True)
class Runner:
    """A loaded artifact: `prepare(inputs)` returns the call to time; `outputs` makes it numpy.

    `timed`, for a runtime in a process of its own (the C++ programs), where one call per process
    would time the process's start: `timed(inputs, warmup, repeat)` runs it once for the outputs,
    then `warmup` untimed and `repeat` timed runs inside that process, and returns the result and
    the process's timing (`tools.cpp.CppPrograms.time`'s: times_ms, cpu_times_ms per run).
    """

    prepare: Callable[[Arrays], Callable[[], Any]]
    outputs: Callable[[Any], Arrays]
    timed: Callable[[Arrays, int, int], tuple[Any, dict[str, Any]]] | None = None

    def __call__(self, inputs: Arrays) -> Arrays:
        return self.outputs(self.prepare(inputs)())


@dataclass
class Context:
    """What one validate or bench run asks of the runtimes, and what they share.

    Args:
        threads: intra-op threads of ONNX Runtime and the C++ programs.
        cpp: build the C++ programs (once, on first use) and run their rows.
        triton: start a real tritonserver for the Triton row; `triton_python` is the Python of
            its environment.
        say: progress lines (the C++ build's).
        model: a whole-model bundle's model as the user wrote it, with the bundle's weights
            (`export.whole.load_whole_model`): what its eager row runs, converted.
        stack: owns the servers that rows start; they stop when it closes.
    """

    threads: int = 1
    cpp: bool = False
    triton: bool = False
    triton_python: str | None = None
    say: Callable[[str], None] | None = None
    model: nn.Module | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _programs: CppPrograms | None = field(default=None, init=False, repr=False)

    def programs(self) -> CppPrograms:
        if self._programs is None:
            from lstm_deploy_export.tools import cpp

            self._programs = cpp.build(progress=self.say)
        return self._programs


# --- helpers --------------------------------------------------------------------------------


def torch_inputs(
    inputs: Arrays, sig: Signature, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """The signature's inputs as tensors, in its order; floating ones in `dtype`."""
    tensors = []
    for spec in sig.inputs:
        t = torch.from_numpy(np.ascontiguousarray(inputs[spec.name]))
        tensors.append(t.to(device, dtype) if t.is_floating_point() else t.to(device))
    return tensors


def arrays(sig: Signature, outputs: Any) -> Arrays:
    """A torch module's outputs by the signature's names: tuples and lists flattened depth first
    (a scripted whole model returns its own structure, maybe one tensor)."""
    tensors = flatten(outputs)
    if len(tensors) != len(sig.outputs):
        raise ValueError(
            f"the model returned {len(tensors)} tensors; the signature has {len(sig.outputs)} "
            f"outputs ({', '.join(sig.output_names)})"
        )
    return {name: t.detach().cpu().numpy() for name, t in zip(sig.output_names, tensors)}


@contextlib.contextmanager
def torch_tf32(enabled: bool) -> Iterator[None]:
    """TF32 on or off for cuBLAS and cuDNN (cuDNN defaults to on), restored afterwards.

    The legacy flags and set_float32_matmul_precision keep torch >= 2.9's fp32_precision
    settings in step; those versions warn that the flags will give way to fp32_precision.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32.*")
        saved = (matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision())
        matmul.allow_tf32 = enabled
        cudnn.allow_tf32 = enabled
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved[0], saved[1]
            torch.set_float32_matmul_precision(saved[2])  # last: the flags also set it


def nn_lstm(model: LSTM, dtype: torch.dtype, device: str = "cpu") -> nn.LSTM:
    """torch.nn.LSTM, batch first, with the model's weights."""
    config = dataclasses.replace(model.config, batch_first=True, dropout=0.0)
    lstm = nn.LSTM(**config.to_dict(), dtype=dtype, device=device).eval()
    lstm.load_state_dict(model.state_dict())
    return lstm


def nn_lstm_call(
    lstm: nn.LSTM, tensors: list[torch.Tensor], pack: bool
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """torch.nn.LSTM on the deployed signature (batch first); packed: its own `lengths`."""
    x, lengths, h0, c0 = tensors  # the order of lstm_signature
    hx = (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous())  # (L*D, B, H)
    steps = x.shape[1]

    @torch.no_grad()
    def call() -> tuple[torch.Tensor, ...]:
        if pack:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, (hn, cn) = lstm(packed, hx)
            output, _ = pad_packed_sequence(out, batch_first=True, total_length=steps)
        else:
            output, (hn, cn) = lstm(x, hx)
        return output, hn.transpose(0, 1), cn.transpose(0, 1)

    return call


def synced(call: Callable[[], Any], device: str, tf32: bool = False) -> Callable[[], Any]:
    """A call that returns when a CUDA device is done, with TF32 as asked; CPU calls as they are."""
    if device == "cpu":
        return call

    def call_and_sync() -> Any:
        with torch_tf32(tf32):
            result = call()
            torch.cuda.synchronize()
        return result

    return call_and_sync


# --- runners --------------------------------------------------------------------------------


def _torch_runner(module: Any, sig: Signature, device: str, tf32: bool = False) -> Runner:
    def prepare(inputs: Arrays) -> Callable[[], Any]:
        tensors = torch_inputs(inputs, sig, device)

        @torch.no_grad()
        def call() -> Any:
            return module(*tensors)

        return synced(call, device, tf32)

    return Runner(prepare, lambda result: arrays(sig, result))


def run_eager(bundle: Bundle, context: Context) -> Runner:
    if not bundle.whole:
        return _torch_runner(DeployLSTM(load_model(bundle)).eval(), bundle.signature, "cpu")
    if context.model is None:
        raise Unavailable("a whole model's eager row needs the model (validate's --module)")
    # As export runs it: each LSTM converted and behind a Tap around its DeployLSTM, the state
    # (streamable) given and taken by the Taps. The references run the model without Taps.
    info = bundle.info
    model, taps = tapped(convert(context.model).float().eval(), lambda m: DeployLSTM(m).eval())
    n_inputs = len(info.signature.inputs) - len(info.state_inputs)
    flat = Flat(model, taps, n_inputs, stateful=bool(info.state)).eval()
    return _torch_runner(flat, bundle.signature, "cpu")


def run_torchscript(device: str, tf32: bool = False) -> Callable[[Bundle, Context], Runner]:
    def make(bundle: Bundle, context: Context) -> Runner:
        module = torch.jit.load(str(bundle.file(TORCHSCRIPT)), map_location=device).eval()
        return _torch_runner(module, bundle.signature, device, tf32)

    return make


def run_aoti(bundle: Bundle, context: Context) -> Runner:
    """model.pt2 through AOTInductor's Python loader (CPU: the package is compiled for it)."""
    from lstm_deploy_export.export.aoti import load_aoti

    sig, run = bundle.signature, load_aoti(bundle.file(AOTI))

    def prepare(inputs: Arrays) -> Callable[[], Any]:
        tensors = torch_inputs(inputs, sig)
        return lambda: run(tensors)

    return Runner(prepare, lambda result: arrays(sig, result))


def run_onnxruntime(
    artifact: str, provider: str, tf32: bool = False
) -> Callable[[Bundle, Context], Runner]:
    def make(bundle: Bundle, context: Context) -> Runner:
        sig = bundle.signature
        try:
            session = ort_session.make_session(
                bundle.file(artifact), provider, context.threads, tf32
            )
        except ort_session.ProviderUnavailable as e:
            raise Unavailable(str(e)) from None

        def prepare(inputs: Arrays) -> Callable[[], Any]:
            feeds = {n: np.ascontiguousarray(inputs[n]) for n in sig.input_names}
            if provider == ort_session.CUDA:
                return ort_session.device_call(session, feeds, sig.output_names, "cuda")
            return lambda: session.run(sig.output_names, feeds)  # numpy in and out, as users do

        def outputs(result: Any) -> Arrays:
            if provider == ort_session.CUDA:
                result = result.copy_outputs_to_cpu()
            return dict(zip(sig.output_names, result))

        return Runner(prepare, outputs)

    return make


def run_nn_lstm(device: str) -> Callable[[Bundle, Context], Runner]:
    def make(bundle: Bundle, context: Context) -> Runner:
        sig, lstm = bundle.signature, nn_lstm(load_model(bundle), torch.float32, device)

        def prepare(inputs: Arrays) -> Callable[[], Any]:
            # Unpacked at full lengths: what bench times is nn.LSTM's own fast kernel.
            pack = bool((inputs[LENGTHS] < inputs[INPUT].shape[1]).any())
            return synced(nn_lstm_call(lstm, torch_inputs(inputs, sig, device), pack), device)

        return Runner(prepare, lambda result: arrays(sig, result))

    return make


def run_cpp(program: str, artifact: str) -> Callable[[Bundle, Context], Runner]:
    def make(bundle: Bundle, context: Context) -> Runner:
        path, programs = bundle.file(artifact), context.programs()

        def prepare(inputs: Arrays) -> Callable[[], Arrays]:
            return lambda: programs.run(program, path, inputs, threads=context.threads)

        def timed(inputs: Arrays, warmup: int, repeat: int) -> tuple[Arrays, dict[str, Any]]:
            return programs.time(
                program, path, inputs, warmup=warmup, repeat=repeat, threads=context.threads
            )

        return Runner(prepare, lambda result: result, timed)

    return make


def run_triton(bundle: Bundle, context: Context) -> Runner:
    """A real tritonserver on the bundle's repository, up until the context's stack closes."""
    import tritonclient.http as http

    from lstm_deploy_export.tools.triton_env import TritonSetupError
    from lstm_deploy_export.tools.triton_server import TritonServer, check_repository, infer

    model = "lstm_python"
    try:
        server = context.stack.enter_context(
            TritonServer(check_repository(bundle, [model]), [model], python=context.triton_python)
        )
    except TritonSetupError as e:
        raise Unavailable(f"Triton cannot run here: {e}") from None
    client = http.InferenceServerClient(server.http_url, network_timeout=300)
    context.stack.callback(client.close)  # closed before the server stops: keep-alive delays it
    outputs = bundle.signature.output_names
    return Runner(lambda inputs: lambda: infer(client, model, inputs, outputs), lambda r: r)


def run_openvino(artifact: str) -> Callable[[Bundle, Context], Runner]:
    def make(bundle: Bundle, context: Context) -> Runner:
        import openvino as ov

        sig = bundle.signature
        # f32: OpenVINO's CPU plugin may otherwise run in bf16 or f16 where the CPU has them.
        compiled = ov.Core().compile_model(
            str(bundle.file(artifact)),
            "CPU",
            {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": context.threads},
        )
        request = compiled.create_infer_request()

        def prepare(inputs: Arrays) -> Callable[[], Any]:
            feeds = {n: np.ascontiguousarray(inputs[n]) for n in sig.input_names}
            return lambda: request.infer(feeds)

        def outputs(result: Any) -> Arrays:  # copies: the request reuses its output buffers
            return {n: np.array(result[compiled.output(n)]) for n in sig.output_names}

        return Runner(prepare, outputs)

    return make


def run_onnx_reference(artifact: str) -> Callable[[Bundle, Context], Runner]:
    def make(bundle: Bundle, context: Context) -> Runner:
        from onnx.reference import ReferenceEvaluator

        sig, evaluator = bundle.signature, ReferenceEvaluator(str(bundle.file(artifact)))

        def prepare(inputs: Arrays) -> Callable[[], Any]:
            feeds = {n: inputs[n] for n in sig.input_names}

            def call() -> Any:
                # Its sigmoid is 1 / (1 + exp(-x)): a saturated gate overflows exp to inf on the
                # way to the exact limit, 0. That is the right answer, not a warning.
                with np.errstate(over="ignore"):
                    return evaluator.run(sig.output_names, feeds)

            return call

        return Runner(prepare, lambda result: dict(zip(sig.output_names, result)))

    return make
