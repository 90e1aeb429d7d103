"""Runners for `validate`: one artifact on one runtime, called with the deployed signature as numpy.

Each runner takes the four inputs (`input`, `lengths`, `h0`, `c0`) as numpy arrays and returns the
three outputs (`output`, `hn`, `cn`) as float32 numpy arrays, whatever runs underneath: the scratch
module in eager PyTorch, TorchScript (CPU, CUDA), ONNX Runtime (CPU, CUDA execution providers) or
the C++ programs of `export/cpp/`. A runtime that is not present on this machine gives a runner
that is skipped with the reason, never one that passes.

The references are here too: the scratch module in float64 (the oracle) and torch.nn.LSTM with the
same weights, run through `pack_padded_sequence` (an independent implementation of `lengths`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstm_deploy import LSTM
from lstm_deploy_export.bundle import WEIGHTS, Bundle
from lstm_deploy_export.graphs import DeployLSTM
from lstm_deploy_export.ort_session import session_options

if TYPE_CHECKING:
    from lstm_deploy_export.cpp import CppPrograms

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]

INPUTS = ("input", "lengths", "h0", "c0")
OUTPUTS = ("output", "hn", "cn")

# Each runtime's precision class names its tolerance (see validate.TOLERANCES).
FLOAT32, CUDA_FLOAT32, TF32 = "float32", "cuda-float32", "tf32"


@dataclass
class Runner:
    """One row of the report: `artifact` on `runtime`.

    Exactly one of `run` (ready), `skipped` (the runtime is not here: why) and `error` (the
    artifact failed to load: a failure) is set.
    """

    runtime: str
    artifact: str
    precision: str
    description: str
    run: RunFn | None = None
    skipped: str | None = None
    error: str | None = None


# --- helpers ----------------------------------------------------------------------------------


def _tensors(inputs: Arrays, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list:
    out = []
    for name in INPUTS:
        t = torch.from_numpy(np.ascontiguousarray(inputs[name]))
        out.append(t.to(device) if name == "lengths" else t.to(device=device, dtype=dtype))
    return out


def _arrays(outputs: Any) -> Arrays:
    return {name: t.detach().cpu().numpy() for name, t in zip(OUTPUTS, outputs)}


@contextlib.contextmanager
def _torch_tf32(enabled: bool) -> Iterator[None]:
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


def cuda_unavailable() -> str | None:
    """Why torch cannot run on CUDA here, or None when it can."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return f"no CUDA device for torch {torch.__version__} ({build})"
    return None


def ort_cuda_unavailable() -> str | None:
    """Why ONNX Runtime cannot use CUDAExecutionProvider here, or None when it can."""
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return (
            f"CUDAExecutionProvider not available (onnxruntime {ort.__version__} has "
            f"{', '.join(providers)}; install onnxruntime-gpu)"
        )
    return None


# --- references ---------------------------------------------------------------------------------


class References:
    """The scratch module in float64 (the oracle) and torch.nn.LSTM (float64 and float32).

    torch.nn.LSTM in float32 is not a reference to pass against: its error against the oracle
    measures how much float32 arithmetic itself loses on this model and input, which the
    tolerance allows for (see validate.Tolerance).
    """

    def __init__(self, model: LSTM) -> None:
        self.oracle = DeployLSTM(model.double()).eval()
        config = dataclasses.replace(model.config, batch_first=True, dropout=0.0)
        self.nn64 = nn.LSTM(**config.to_dict(), dtype=torch.float64).eval()
        self.nn64.load_state_dict(model.state_dict())
        self.nn32 = nn.LSTM(**config.to_dict(), dtype=torch.float32).eval()
        self.nn32.load_state_dict(model.state_dict())

    @torch.no_grad()
    def run_oracle(self, inputs: Arrays) -> Arrays:
        x, lengths, h0, c0 = _tensors(inputs, dtype=torch.float64)
        output, hn, cn = self.oracle(x, lengths, h0, c0)
        return _arrays((output, hn, cn))

    @torch.no_grad()
    def run_torch(self, inputs: Arrays, dtype: torch.dtype) -> Arrays:
        """torch.nn.LSTM on a packed batch: its own implementation of `lengths`."""
        lstm = self.nn64 if dtype == torch.float64 else self.nn32
        x, lengths, h0, c0 = _tensors(inputs, dtype=dtype)
        steps = x.shape[1]
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        hx = (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous())  # (L*D, B, H)
        out, (hn, cn) = lstm(packed, hx)
        output, _ = pad_packed_sequence(out, batch_first=True, total_length=steps)
        return _arrays((output, hn.transpose(0, 1), cn.transpose(0, 1)))


# --- runners --------------------------------------------------------------------------------------


def _scratch_eager(bundle: Bundle) -> RunFn:
    module = DeployLSTM(bundle.load_model().float()).eval()

    @torch.no_grad()
    def run(inputs: Arrays) -> Arrays:
        return _arrays(module(*_tensors(inputs)))

    return run


def _torchscript(path: Path, device: str, tf32: bool) -> RunFn:
    module = torch.jit.load(str(path), map_location=device)
    module.eval()

    @torch.no_grad()
    def run(inputs: Arrays) -> Arrays:
        with _torch_tf32(tf32) if device == "cuda" else contextlib.nullcontext():
            outputs = module(*_tensors(inputs, device))
            if device == "cuda":
                torch.cuda.synchronize()
        return _arrays(outputs)

    return run


def _onnxruntime(path: Path, provider: str, tf32: bool) -> RunFn:
    options = session_options(threads=1)  # see validate(): one thread, no spinning between runs
    options.log_severity_level = 3  # errors only: node placement notes are not findings
    if provider == "CUDAExecutionProvider":
        # use_tf32 defaults to 1 in the CUDA provider: the parity run switches it off.
        providers: list[Any] = [
            ("CUDAExecutionProvider", {"use_tf32": str(int(tf32))}),
            "CPUExecutionProvider",
        ]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if provider not in session.get_providers():  # onnxruntime logged why (CUDA libraries?)
        raise _Unavailable(
            f"{provider} failed to initialise; the session fell back to {session.get_providers()}"
        )

    def run(inputs: Arrays) -> Arrays:
        outputs = session.run(list(OUTPUTS), {k: np.ascontiguousarray(inputs[k]) for k in INPUTS})
        return dict(zip(OUTPUTS, outputs))

    return run


class _Unavailable(Exception):
    """Raised while building a runner whose runtime turns out not to be usable here."""


def _cpp(programs: CppPrograms, runtime: str, path: Path) -> RunFn:
    run = programs.run_torchscript if runtime == "cpp-libtorch" else programs.run_onnxruntime
    return lambda inputs: run(path, inputs)


# (runtime, artifact, precision, description); the order is the report's.
CPU_ROWS = [
    ("pytorch-eager", WEIGHTS, FLOAT32, "scratch module, eager PyTorch, CPU"),
    ("torchscript-cpu", "model.pt", FLOAT32, "torch.jit.load, CPU"),
    ("onnxruntime-cpu", "model.onnx", FLOAT32, "onnxruntime, CPUExecutionProvider"),
    ("onnxruntime-cpu", "model.scan.onnx", FLOAT32, "onnxruntime, CPUExecutionProvider"),
]
CUDA_ROWS = [
    ("torchscript-cuda", "model.pt", CUDA_FLOAT32, "torch.jit.load, CUDA, TF32 off"),
    ("onnxruntime-cuda", "model.onnx", CUDA_FLOAT32, "CUDAExecutionProvider, use_tf32=0"),
    ("onnxruntime-cuda", "model.scan.onnx", CUDA_FLOAT32, "CUDAExecutionProvider, use_tf32=0"),
]
TF32_ROWS = [
    ("torchscript-cuda-tf32", "model.pt", TF32, "torch.jit.load, CUDA, TF32 on"),
    ("onnxruntime-cuda-tf32", "model.onnx", TF32, "CUDAExecutionProvider, use_tf32=1"),
]
TRITON_ROWS = [
    ("triton-python", "model.onnx", FLOAT32, "Triton python backend (lstm_python), tritonclient"),
]
CPP_ROWS = [
    ("cpp-libtorch", "model.pt", FLOAT32, "C++ LibTorch (export/cpp lstm_torchscript)"),
    ("cpp-onnxruntime", "model.onnx", FLOAT32, "C++ ONNX Runtime (export/cpp lstm_onnxruntime)"),
    ("cpp-onnxruntime", "model.scan.onnx", FLOAT32, "C++ ONNX Runtime (lstm_onnxruntime)"),
]


def _missing_artifact(bundle: Bundle, artifact: str) -> str | None:
    if bundle.has(artifact):
        return None
    if artifact == "model.onnx" and bundle.config.proj_size > 0:
        return "model.onnx is not in the bundle (the ONNX LSTM op has no projection: proj_size > 0)"
    return f"{artifact} is not in the bundle (exported without it)"


def _triton(bundle: Bundle, python: str | None, stack: contextlib.ExitStack) -> RunFn:
    """A real tritonserver on the bundle's repository, up until `stack` closes."""
    import tritonclient.http as http

    from lstm_deploy_export.triton_server import TritonServer, TritonSetupError, infer

    try:
        server = stack.enter_context(
            TritonServer(bundle.path / "triton", ["lstm_python"], python=python)
        )
    except TritonSetupError as e:
        raise _Unavailable(f"Triton cannot run here: {e}") from None
    client = http.InferenceServerClient(server.http_url, network_timeout=300)
    stack.callback(client.close)  # closed before the server stops: keep-alive delays its exit
    return lambda inputs: infer(client, "lstm_python", inputs)


def runners(
    bundle: Bundle,
    cpp: bool = False,
    tf32: bool = False,
    say: Callable[[str], None] | None = None,
    triton: bool = False,
    triton_python: str | None = None,
    stack: contextlib.ExitStack | None = None,
) -> list[Runner]:
    """Every row of the report, each ready to run, skipped with a reason, or failed to load.

    Rows that hold a server (Triton) keep it up until `stack` closes.
    """
    programs: CppPrograms | None = None
    cpp_reason: str | None = "not requested (pass --cpp to build and run the C++ programs)"
    if cpp:
        from lstm_deploy_export import cpp as cpp_build

        try:  # build() reports missing tools and failed builds in .unavailable; this is the rest
            programs, cpp_reason = cpp_build.build(progress=say), None
        except (cpp_build.CppError, OSError) as e:
            cpp_reason = f"the C++ build failed: {e}"
    skipped = {
        "torchscript-cuda": cuda_unavailable(),
        "onnxruntime-cuda": ort_cuda_unavailable(),
        "cpp-": cpp_reason,
        "triton-": None if triton else "not requested (pass --triton to start a real tritonserver)",
    }
    rows = CPU_ROWS + CUDA_ROWS + (TF32_ROWS if tf32 else []) + CPP_ROWS + TRITON_ROWS
    result = []
    for runtime, artifact, precision, description in rows:
        runner = Runner(runtime, artifact, precision, description)
        runner.skipped = _missing_artifact(bundle, artifact) or next(
            (why for prefix, why in skipped.items() if runtime.startswith(prefix)), None
        )
        if runner.skipped is None and programs is not None and runtime.startswith("cpp-"):
            program = PROGRAM[runtime]
            if program not in programs.paths:
                runner.skipped = f"{program} not built: {programs.unavailable.get(program)}"
        if runner.skipped is None:
            try:
                if runtime.startswith("triton-"):
                    assert stack is not None, "Triton rows need a stack that owns the server"
                    runner.run = _triton(bundle, triton_python, stack)
                else:
                    runner.run = _make(bundle, runtime, artifact, programs)
            except _Unavailable as e:
                runner.skipped = str(e)
            except Exception as e:  # the runtime is here but cannot load the artifact
                runner.error = f"could not load {artifact}: {type(e).__name__}: {e}"
        result.append(runner)
    return result


PROGRAM = {"cpp-libtorch": "lstm_torchscript", "cpp-onnxruntime": "lstm_onnxruntime"}


def _make(bundle: Bundle, runtime: str, artifact: str, programs: CppPrograms | None) -> RunFn:
    path = bundle.path / artifact
    tf32 = runtime.endswith("-tf32")
    if runtime == "pytorch-eager":
        return _scratch_eager(bundle)
    if runtime.startswith("torchscript-"):
        return _torchscript(path, "cpu" if runtime == "torchscript-cpu" else "cuda", tf32)
    if runtime == "onnxruntime-cpu":
        return _onnxruntime(path, "CPUExecutionProvider", tf32)
    if runtime.startswith("onnxruntime-cuda"):
        return _onnxruntime(path, "CUDAExecutionProvider", tf32)
    assert programs is not None and runtime in PROGRAM, runtime
    return _cpp(programs, runtime, path)
