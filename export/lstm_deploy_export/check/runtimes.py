"""The runtime registry: every way to run a bundle's artifact, as data. Validate and bench use it.

An entry (`Runtime`) names a runtime and the artifact it runs, its device and precision class
(which names its tolerance), says why it cannot run here (`available`), and loads a `Runner`
(`make`). A runner takes the signature's inputs as numpy arrays and returns its outputs as numpy
arrays, whatever runs underneath: the scratch module in eager PyTorch, TorchScript (CPU, CUDA),
ONNX Runtime (CPU, CUDA), torch.nn.LSTM (bench's reference), the C++ programs of export/cpp, or a
real Triton server. `Runner.prepare` does the untimed work (tensors onto the device) and returns
the call that bench times. A runtime that is not present gives a reason, never a pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstm_deploy.bundle import (
    INPUT,
    LENGTHS,
    ONNX,
    SCAN_ONNX,
    TORCHSCRIPT,
    WEIGHTS,
    Bundle,
    Signature,
)
from lstm_deploy.model import LSTM
from lstm_deploy_export.check import ort_session
from lstm_deploy_export.check.compare import CUDA_FLOAT32, FLOAT32, TF32
from lstm_deploy_export.export.graphs import DeployLSTM
from lstm_deploy_export.export.writer import load_model

if TYPE_CHECKING:
    from lstm_deploy_export.tools.cpp import CppPrograms

Arrays = dict[str, np.ndarray]


class Unavailable(Exception):
    """Raised while loading a runner whose runtime turns out not to be usable here."""


@dataclass(frozen=True)
class Runner:
    """A loaded artifact: `prepare(inputs)` returns the call to time; `outputs` makes it numpy."""

    prepare: Callable[[Arrays], Callable[[], Any]]
    outputs: Callable[[Any], Arrays]

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
        stack: owns the servers that rows start; they stop when it closes.
    """

    threads: int = 1
    cpp: bool = False
    triton: bool = False
    triton_python: str | None = None
    say: Callable[[str], None] | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _programs: CppPrograms | None = field(default=None, init=False, repr=False)

    def programs(self) -> CppPrograms:
        if self._programs is None:
            from lstm_deploy_export.tools import cpp

            self._programs = cpp.build(progress=self.say)
        return self._programs


@dataclass(frozen=True)
class Runtime:
    """One row of validate, one backend of bench: `artifact` on `name`, as data."""

    name: str  # validate's runtime column, e.g. "onnxruntime-cpu"
    artifact: str  # the bundle file it runs
    label: str  # bench's backend name, e.g. "model.onnx (ORT CUDA)"
    device: str  # "cpu" or "cuda"
    precision: str  # its tolerance class
    description: str
    available: Callable[[Context], str | None]  # why it cannot run here, or None
    make: Callable[[Bundle, Context], Runner]
    reference: bool = False  # bench's reference (torch.nn.LSTM), not a validate row
    untimed: str | None = None  # why bench does not time it

    def unavailable(self, bundle: Bundle, context: Context) -> str | None:
        """Why this row is skipped for `bundle` here, or None when it can run."""
        if not bundle.has(self.artifact):
            if self.artifact == ONNX and bundle.config.proj_size > 0:
                return (
                    f"{ONNX} is not in the bundle (the ONNX LSTM op has no projection: "
                    "proj_size > 0)"
                )
            return f"{self.artifact} is not in the bundle (exported without it)"
        return self.available(context)

    def load(self, bundle: Bundle, context: Context) -> Runner:
        return self.make(bundle, context)


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
    return {name: t.detach().cpu().numpy() for name, t in zip(sig.output_names, outputs)}


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


def cuda_unavailable(context: Context | None = None) -> str | None:
    """Why torch cannot run on CUDA here, or None when it can."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return f"no CUDA device for torch {torch.__version__} ({build})"
    return None


def ort_cuda_unavailable(context: Context | None = None) -> str | None:
    return ort_session.cuda_unavailable()


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


def _synced(call: Callable[[], Any], device: str, tf32: bool = False) -> Callable[[], Any]:
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

        return _synced(call, device, tf32)

    return Runner(prepare, lambda result: arrays(sig, result))


def _eager(bundle: Bundle, context: Context) -> Runner:
    return _torch_runner(DeployLSTM(load_model(bundle)).eval(), bundle.signature, "cpu")


def _torchscript(device: str, tf32: bool = False) -> Callable[[Bundle, Context], Runner]:
    def make(bundle: Bundle, context: Context) -> Runner:
        module = torch.jit.load(str(bundle.file(TORCHSCRIPT)), map_location=device).eval()
        return _torch_runner(module, bundle.signature, device, tf32)

    return make


def _onnxruntime(
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
            return lambda: session.run(sig.output_names, feeds)  # numpy in and out, as users do

        return Runner(prepare, lambda result: dict(zip(sig.output_names, result)))

    return make


def _nn_lstm(device: str) -> Callable[[Bundle, Context], Runner]:
    def make(bundle: Bundle, context: Context) -> Runner:
        sig, lstm = bundle.signature, nn_lstm(load_model(bundle), torch.float32, device)

        def prepare(inputs: Arrays) -> Callable[[], Any]:
            # Unpacked at full lengths: what bench times is nn.LSTM's own fast kernel.
            pack = bool((inputs[LENGTHS] < inputs[INPUT].shape[1]).any())
            return _synced(nn_lstm_call(lstm, torch_inputs(inputs, sig, device), pack), device)

        return Runner(prepare, lambda result: arrays(sig, result))

    return make


def _cpp_available(program: str) -> Callable[[Context], str | None]:
    def available(context: Context) -> str | None:
        if not context.cpp:
            return "not requested (pass --cpp to build and run the C++ programs)"
        programs = context.programs()
        if program not in programs.paths:
            return f"{program} not built: {programs.unavailable.get(program)}"
        return None

    return available


def _cpp(program: str, artifact: str) -> Callable[[Bundle, Context], Runner]:
    def make(bundle: Bundle, context: Context) -> Runner:
        path, programs = bundle.file(artifact), context.programs()

        def prepare(inputs: Arrays) -> Callable[[], Arrays]:
            return lambda: programs.run(program, path, inputs, threads=context.threads)

        return Runner(prepare, lambda result: result)

    return make


def _triton_available(context: Context) -> str | None:
    return None if context.triton else "not requested (pass --triton to start a real tritonserver)"


def _triton(bundle: Bundle, context: Context) -> Runner:
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


def _always(context: Context) -> str | None:
    return None


def _openvino_available(context: Context) -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed (pip install 'lstm-deploy[openvino]')"
    return None


def _openvino(artifact: str) -> Callable[[Bundle, Context], Runner]:
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


def _onnx_reference(artifact: str) -> Callable[[Bundle, Context], Runner]:
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


_NO_CPP_TIMING = (
    "the C++ programs of export/cpp have no timing mode (one forward per process, inputs "
    "through .npy files: process start and file I/O would dominate)"
)

_REFERENCE_SPEED = "a reference implementation in numpy, written to be read, not to be fast"

# The registry. Its order is the report's.
RUNTIMES = (
    Runtime("torch-nn-lstm", WEIGHTS, "torch.nn.LSTM", "cpu", FLOAT32,
            "torch.nn.LSTM, same weights, CPU", _always, _nn_lstm("cpu"), reference=True),
    Runtime("torch-nn-lstm-cuda", WEIGHTS, "torch.nn.LSTM (cuda)", "cuda", CUDA_FLOAT32,
            "torch.nn.LSTM, same weights, cuDNN", cuda_unavailable, _nn_lstm("cuda"),
            reference=True),
    Runtime("pytorch-eager", WEIGHTS, "scratch eager", "cpu", FLOAT32,
            "scratch module, eager PyTorch, CPU", _always, _eager),
    Runtime("torchscript-cpu", TORCHSCRIPT, "model.pt", "cpu", FLOAT32,
            "torch.jit.load, CPU", _always, _torchscript("cpu")),
    Runtime("onnxruntime-cpu", ONNX, "model.onnx", "cpu", FLOAT32,
            "onnxruntime, CPUExecutionProvider", _always, _onnxruntime(ONNX, ort_session.CPU)),
    Runtime("onnxruntime-cpu", SCAN_ONNX, "model.scan.onnx", "cpu", FLOAT32,
            "onnxruntime, CPUExecutionProvider", _always,
            _onnxruntime(SCAN_ONNX, ort_session.CPU)),
    Runtime("openvino-cpu", ONNX, "model.onnx (OpenVINO)", "cpu", FLOAT32,
            "OpenVINO, CPU, INFERENCE_PRECISION_HINT f32", _openvino_available,
            _openvino(ONNX)),
    Runtime("openvino-cpu", SCAN_ONNX, "model.scan.onnx (OpenVINO)", "cpu", FLOAT32,
            "OpenVINO, CPU, INFERENCE_PRECISION_HINT f32", _openvino_available,
            _openvino(SCAN_ONNX)),
    Runtime("onnx-reference", ONNX, "model.onnx (onnx reference)", "cpu", FLOAT32,
            "onnx.reference.ReferenceEvaluator (numpy)", _always, _onnx_reference(ONNX),
            untimed=_REFERENCE_SPEED),
    Runtime("onnx-reference", SCAN_ONNX, "model.scan.onnx (onnx reference)", "cpu", FLOAT32,
            "onnx.reference.ReferenceEvaluator (numpy)", _always, _onnx_reference(SCAN_ONNX),
            untimed=_REFERENCE_SPEED),
    Runtime("torchscript-cuda", TORCHSCRIPT, "model.pt (cuda)", "cuda", CUDA_FLOAT32,
            "torch.jit.load, CUDA, TF32 off", cuda_unavailable, _torchscript("cuda")),
    Runtime("onnxruntime-cuda", ONNX, "model.onnx (ORT CUDA)", "cuda", CUDA_FLOAT32,
            "CUDAExecutionProvider, use_tf32=0", ort_cuda_unavailable,
            _onnxruntime(ONNX, ort_session.CUDA)),
    Runtime("onnxruntime-cuda", SCAN_ONNX, "model.scan.onnx (ORT CUDA)", "cuda", CUDA_FLOAT32,
            "CUDAExecutionProvider, use_tf32=0", ort_cuda_unavailable,
            _onnxruntime(SCAN_ONNX, ort_session.CUDA)),
    Runtime("torchscript-cuda-tf32", TORCHSCRIPT, "model.pt (cuda, TF32)", "cuda", TF32,
            "torch.jit.load, CUDA, TF32 on", cuda_unavailable, _torchscript("cuda", tf32=True)),
    Runtime("onnxruntime-cuda-tf32", ONNX, "model.onnx (ORT CUDA, TF32)", "cuda", TF32,
            "CUDAExecutionProvider, use_tf32=1", ort_cuda_unavailable,
            _onnxruntime(ONNX, ort_session.CUDA, tf32=True)),
    Runtime("cpp-libtorch", TORCHSCRIPT, "model.pt (C++ LibTorch)", "cpu", FLOAT32,
            "C++ LibTorch (export/cpp lstm_torchscript)", _cpp_available("lstm_torchscript"),
            _cpp("lstm_torchscript", TORCHSCRIPT), untimed=_NO_CPP_TIMING),
    Runtime("cpp-onnxruntime", ONNX, "model.onnx (C++ ONNX Runtime)", "cpu", FLOAT32,
            "C++ ONNX Runtime (export/cpp lstm_onnxruntime)", _cpp_available("lstm_onnxruntime"),
            _cpp("lstm_onnxruntime", ONNX), untimed=_NO_CPP_TIMING),
    Runtime("cpp-onnxruntime", SCAN_ONNX, "model.scan.onnx (C++ ONNX Runtime)", "cpu", FLOAT32,
            "C++ ONNX Runtime (lstm_onnxruntime)", _cpp_available("lstm_onnxruntime"),
            _cpp("lstm_onnxruntime", SCAN_ONNX), untimed=_NO_CPP_TIMING),
    Runtime("triton-python", ONNX, "model.onnx (Triton python)", "cpu", FLOAT32,
            "Triton python backend (lstm_python), tritonclient", _triton_available, _triton,
            untimed="a server: time it with lstm-deploy loadtest"),
)  # fmt: skip
