"""The runtime registry: every way to run a bundle's artifact, as data. Validate and bench use it.

An entry (`Runtime`) names a runtime and the artifact it runs, its bench label, device and
precision class (which names its tolerance), says why it cannot run here (`available`), and makes
a `runners.Runner` (`make`). Validate's rows are the entries (bench's torch.nn.LSTM references
left out); bench's backends are the entries it can time. A runtime that is not present gives a
reason, never a pass.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lstm_deploy.bundle import AOTI, INT8_ONNX, ONNX, SCAN_ONNX, TORCHSCRIPT, WEIGHTS, Bundle
from lstm_deploy_export.check import ort_session
from lstm_deploy_export.check.compare import CUDA_FLOAT32, FLOAT32, INT8, TF32
from lstm_deploy_export.check.runners import (
    Context,
    Runner,
    run_aoti,
    run_cpp,
    run_eager,
    run_nn_lstm,
    run_onnx_reference,
    run_onnxruntime,
    run_openvino,
    run_torchscript,
    run_triton,
)


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
    # Runs in a process of its own (the C++ programs): it times itself (Runner.timed), and bench's
    # peak-RSS children, which measure a Python process, leave it out.
    own_process: bool = False

    def unavailable(self, bundle: Bundle, context: Context) -> str | None:
        """Why this row is skipped for `bundle` here, or None when it can run."""
        if not bundle.has(self.artifact):
            if self.artifact in (ONNX, INT8_ONNX) and _projected(bundle):
                return (
                    f"{self.artifact} is not in the bundle (the ONNX LSTM op has no projection: "
                    "proj_size > 0)"
                )
            skipped = bundle.skipped(self.artifact)  # the export's reason, e.g. no C++ compiler
            if skipped is not None:
                return f"{self.artifact} is not in the bundle: {skipped}"
            return f"{self.artifact} is not in the bundle (exported without it)"
        return self.available(context)


def _projected(bundle: Bundle) -> bool:
    """Whether an LSTM of the bundle has proj_size > 0 (a whole model's: any of its LSTMs)."""
    if bundle.whole:
        lstms = bundle.manifest["model"].get("lstms") or {}
        return any(config.get("proj_size", 0) > 0 for config in lstms.values())
    return bundle.config.proj_size > 0


# --- why a runtime cannot run here -----------------------------------------------------------


def cuda_unavailable(context: Context | None = None) -> str | None:
    """Why torch cannot run on CUDA here, or None when it can."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return f"no CUDA device for torch {torch.__version__} ({build})"
    return None


def ort_cuda_unavailable(context: Context | None = None) -> str | None:
    return ort_session.cuda_unavailable()


def _cpp_available(program: str) -> Callable[[Context], str | None]:
    def available(context: Context) -> str | None:
        if not context.cpp:
            return "not requested (pass --cpp to build and run the C++ programs)"
        programs = context.programs()
        if program not in programs.paths:
            return f"{program} not built: {programs.unavailable.get(program)}"
        return None

    return available


def _triton_available(context: Context) -> str | None:
    return None if context.triton else "not requested (pass --triton to start a real tritonserver)"


def _always(context: Context) -> str | None:
    return None


def _openvino_available(context: Context) -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed (pip install 'lstm-deploy[openvino]')"
    return None


_REFERENCE_SPEED = "a reference implementation in numpy, written to be read, not to be fast"


# Where model.int8.onnx does not run, and why (tests/test_int8.py shows each on this machine but
# CUDA's). Its DynamicQuantizeLSTM is an ONNX Runtime contrib op, registered for the CPU only.
def _int8_not_on(reason: str) -> Callable[[Context], str | None]:
    return lambda context: reason


_INT8_OPENVINO = _int8_not_on(
    f"OpenVINO ignores the LSTM op's sequence_lens, which {INT8_ONNX} relies on (its pad flag's "
    f"weights are zeroed for quantization): c_n would be wrong at variable lengths; run {ONNX}"
)
_INT8_REFERENCE = _int8_not_on(
    "onnx's reference evaluator has no DynamicQuantizeLSTM (an ONNX Runtime contrib op, "
    "domain com.microsoft)"
)
_INT8_CUDA = _int8_not_on(
    "ONNX Runtime has no CUDA kernel for DynamicQuantizeLSTM (CPU only): its LSTM ops would run "
    "on the CPU"
)

# The registry. Its order is the report's.
RUNTIMES = (
    Runtime("torch-nn-lstm", WEIGHTS, "torch.nn.LSTM", "cpu", FLOAT32,
            "torch.nn.LSTM, same weights, CPU", _always, run_nn_lstm("cpu"), reference=True),
    Runtime("torch-nn-lstm-cuda", WEIGHTS, "torch.nn.LSTM (cuda)", "cuda", CUDA_FLOAT32,
            "torch.nn.LSTM, same weights, cuDNN", cuda_unavailable, run_nn_lstm("cuda"),
            reference=True),
    Runtime("pytorch-eager", WEIGHTS, "scratch eager", "cpu", FLOAT32,
            "scratch module, eager PyTorch, CPU", _always, run_eager),
    Runtime("torchscript-cpu", TORCHSCRIPT, "model.pt", "cpu", FLOAT32,
            "torch.jit.load, CPU", _always, run_torchscript("cpu")),
    Runtime("onnxruntime-cpu", ONNX, "model.onnx", "cpu", FLOAT32,
            "onnxruntime, CPUExecutionProvider", _always, run_onnxruntime(ONNX, ort_session.CPU)),
    Runtime("onnxruntime-cpu", SCAN_ONNX, "model.scan.onnx", "cpu", FLOAT32,
            "onnxruntime, CPUExecutionProvider", _always,
            run_onnxruntime(SCAN_ONNX, ort_session.CPU)),
    Runtime("openvino-cpu", ONNX, "model.onnx (OpenVINO)", "cpu", FLOAT32,
            "OpenVINO, CPU, INFERENCE_PRECISION_HINT f32", _openvino_available,
            run_openvino(ONNX)),
    Runtime("openvino-cpu", SCAN_ONNX, "model.scan.onnx (OpenVINO)", "cpu", FLOAT32,
            "OpenVINO, CPU, INFERENCE_PRECISION_HINT f32", _openvino_available,
            run_openvino(SCAN_ONNX)),
    Runtime("onnx-reference", ONNX, "model.onnx (onnx reference)", "cpu", FLOAT32,
            "onnx.reference.ReferenceEvaluator (numpy)", _always, run_onnx_reference(ONNX),
            untimed=_REFERENCE_SPEED),
    Runtime("onnx-reference", SCAN_ONNX, "model.scan.onnx (onnx reference)", "cpu", FLOAT32,
            "onnx.reference.ReferenceEvaluator (numpy)", _always, run_onnx_reference(SCAN_ONNX),
            untimed=_REFERENCE_SPEED),
    Runtime("onnxruntime-cpu", INT8_ONNX, "model.int8.onnx", "cpu", INT8,
            "onnxruntime, CPUExecutionProvider (DynamicQuantizeLSTM)", _always,
            run_onnxruntime(INT8_ONNX, ort_session.CPU)),
    Runtime("openvino-cpu", INT8_ONNX, "model.int8.onnx (OpenVINO)", "cpu", INT8,
            "OpenVINO, CPU", _INT8_OPENVINO, run_openvino(INT8_ONNX)),
    Runtime("onnx-reference", INT8_ONNX, "model.int8.onnx (onnx reference)", "cpu", INT8,
            "onnx.reference.ReferenceEvaluator (numpy)", _INT8_REFERENCE,
            run_onnx_reference(INT8_ONNX), untimed=_REFERENCE_SPEED),
    Runtime("aoti-cpu", AOTI, "model.pt2", "cpu", FLOAT32,
            "torch._inductor.aoti_load_package, CPU", _always, run_aoti),
    Runtime("torchscript-cuda", TORCHSCRIPT, "model.pt (cuda)", "cuda", CUDA_FLOAT32,
            "torch.jit.load, CUDA, TF32 off", cuda_unavailable, run_torchscript("cuda")),
    Runtime("onnxruntime-cuda", ONNX, "model.onnx (ORT CUDA)", "cuda", CUDA_FLOAT32,
            "CUDAExecutionProvider, use_tf32=0", ort_cuda_unavailable,
            run_onnxruntime(ONNX, ort_session.CUDA)),
    Runtime("onnxruntime-cuda", SCAN_ONNX, "model.scan.onnx (ORT CUDA)", "cuda", CUDA_FLOAT32,
            "CUDAExecutionProvider, use_tf32=0", ort_cuda_unavailable,
            run_onnxruntime(SCAN_ONNX, ort_session.CUDA)),
    Runtime("onnxruntime-cuda", INT8_ONNX, "model.int8.onnx (ORT CUDA)", "cuda", INT8,
            "CUDAExecutionProvider", _INT8_CUDA, run_onnxruntime(INT8_ONNX, ort_session.CUDA)),
    Runtime("torchscript-cuda-tf32", TORCHSCRIPT, "model.pt (cuda, TF32)", "cuda", TF32,
            "torch.jit.load, CUDA, TF32 on", cuda_unavailable, run_torchscript("cuda", tf32=True)),
    Runtime("onnxruntime-cuda-tf32", ONNX, "model.onnx (ORT CUDA, TF32)", "cuda", TF32,
            "CUDAExecutionProvider, use_tf32=1", ort_cuda_unavailable,
            run_onnxruntime(ONNX, ort_session.CUDA, tf32=True)),
    Runtime("cpp-libtorch", TORCHSCRIPT, "model.pt (C++ LibTorch)", "cpu", FLOAT32,
            "C++ LibTorch (export/cpp lstm_torchscript)", _cpp_available("lstm_torchscript"),
            run_cpp("lstm_torchscript", TORCHSCRIPT), own_process=True),
    Runtime("cpp-aoti", AOTI, "model.pt2 (C++ AOTInductor)", "cpu", FLOAT32,
            "C++ AOTIModelPackageLoader (export/cpp lstm_aoti)", _cpp_available("lstm_aoti"),
            run_cpp("lstm_aoti", AOTI), own_process=True),
    Runtime("cpp-onnxruntime", ONNX, "model.onnx (C++ ONNX Runtime)", "cpu", FLOAT32,
            "C++ ONNX Runtime (export/cpp lstm_onnxruntime)", _cpp_available("lstm_onnxruntime"),
            run_cpp("lstm_onnxruntime", ONNX), own_process=True),
    Runtime("cpp-onnxruntime", SCAN_ONNX, "model.scan.onnx (C++ ONNX Runtime)", "cpu", FLOAT32,
            "C++ ONNX Runtime (lstm_onnxruntime)", _cpp_available("lstm_onnxruntime"),
            run_cpp("lstm_onnxruntime", SCAN_ONNX), own_process=True),
    Runtime("cpp-onnxruntime", INT8_ONNX, "model.int8.onnx (C++ ONNX Runtime)", "cpu", INT8,
            "C++ ONNX Runtime (lstm_onnxruntime)", _cpp_available("lstm_onnxruntime"),
            run_cpp("lstm_onnxruntime", INT8_ONNX), own_process=True),
    Runtime("triton-python", ONNX, "model.onnx (Triton python)", "cpu", FLOAT32,
            "Triton python backend (lstm_python), tritonclient", _triton_available, run_triton,
            untimed="a server: time it with lstm-deploy loadtest"),
)  # fmt: skip
