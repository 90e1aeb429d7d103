"""`model.int8.onnx`: model.onnx with its LSTM weights in int8, for ONNX Runtime on the CPU.

ONNX Runtime's dynamic quantization (`quantize_dynamic`) turns each `LSTM` op into
`com.microsoft.DynamicQuantizeLSTM`: W and R stored in int8 with a float scale per output channel
(one per gate row, zero point 0, which its kernel requires of signed weights); at run time each
GEMM quantizes its float input (x for all steps at once, h at each step) to uint8 over that
input's range and accumulates in int32 (MLAS; VNNI/AMX where the CPU has them). Everything else
in the graph, the exact-length logic around the op included, stays float32 and unchanged.

The choices, measured on validate's sweep (README "Parity", int8):

- The pad flag's column of W (graphs.NativeOnnxLSTM: +-1e4 in the i and f rows, which freezes the
  state at padded steps on runtimes that ignore `sequence_lens`) is zeroed first. Quantized with
  its row, it would set the row's scale (1e4 / 127 = 79) and round every other weight of the i
  and f gates to 0: max abs error up to 0.34 on random weights instead of ~1e-2. ONNX Runtime,
  whose op this is, honours `sequence_lens` (DynamicQuantizeLSTM shares the LSTM kernel's loop):
  the state is not updated past a sequence's length, so c_n is still the state at step
  length - 1. OpenVINO reads the op but ignores `sequence_lens`: left out (check.runtimes).
- Per channel: a scale per gate row rather than one per direction. Within 10% on random weights
  (thorough sweep, H 8 to 512), better where gate rows differ in scale (max abs at T = 1 on the
  trained recall model 1.5e-2 against 2.0e-2; forget-gate bias +3: 0.25 against 0.49), as fast.
- 8-bit weights (reduce_range off): 7-bit weights (reduce_range) were 1.1x to 4x less accurate.
  reduce_range exists for CPUs without VNNI, whose u8 x s8 instruction (vpmaddubsw) can saturate
  int16 sums; validate on such a CPU measures whether it matters there.
- Weight type: int8 whatever `weight_type` says; ONNX Runtime's LSTM quantizer always writes int8.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lstm_deploy.versions import installed
from lstm_deploy_export.export.exporters import op_types
from lstm_deploy_export.export.graphs import _FREEZE, ExportError

QUANTIZED_OP = "DynamicQuantizeLSTM"  # com.microsoft: an ONNX Runtime contrib op, CPU kernel only
GRAPH_KIND = "int8"  # the graph's lstm_deploy.graph property
SETTINGS = {"per_channel": True, "reduce_range": False}  # see the module docstring

__all__ = ["QUANTIZED_OP", "quantize_onnx"]


def quantize_onnx(source: str | Path, path: str | Path) -> Path:
    """Write `path`: the native-LSTM graph `source` (model.onnx) with its LSTM ops quantized.

    Raises:
        ExportError: `source` is not a graph of NativeOnnxLSTM, or ONNX Runtime left an LSTM op
            unquantized.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(source))
    lstms = [n for n in proto.graph.node if n.op_type == "LSTM"]
    if not lstms:
        raise ExportError(f"{source} has no LSTM op to quantize (it is not model.onnx)")
    for node in lstms:
        _zero_pad_flag(proto, node)
    with _quiet_quantizer():
        quantize_dynamic(
            proto,
            str(path),
            op_types_to_quantize=["LSTM"],
            weight_type=QuantType.QInt8,
            **SETTINGS,
        )
    quantized = onnx.load(str(path))
    ops = op_types(quantized)
    if "LSTM" in ops or QUANTIZED_OP not in ops:
        raise ExportError(
            f"onnxruntime {installed('onnxruntime')} did not turn every LSTM op of {source} into "
            f"{QUANTIZED_OP} (found {sorted(ops & {'LSTM', QUANTIZED_OP})}); please report it"
        )
    props = {p.key: p.value for p in quantized.metadata_props}
    props["lstm_deploy.graph"] = GRAPH_KIND
    props["lstm_deploy.quantization"] = (
        f"onnxruntime {installed('onnxruntime')} quantize_dynamic, int8 weights, "
        + ", ".join(f"{k}={v}" for k, v in SETTINGS.items())
    )
    onnx.helper.set_model_props(quantized, props)
    onnx.save(quantized, str(path))
    return Path(path)


def _zero_pad_flag(proto: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Zero the pad flag's column of the op's W (1, 4H, I + 1), after checking that it is one."""
    init = next((i for i in proto.graph.initializer if i.name == node.input[1]), None)
    if init is None:
        raise ExportError(f"LSTM op {node.name!r}: its W is not a constant; cannot quantize it")
    w = numpy_helper.to_array(init).copy()  # (1, 4H, I + 1), gate blocks i, o, f, c
    h = w.shape[1] // 4
    expected = np.repeat(np.array([-_FREEZE, 0.0, _FREEZE, 0.0], w.dtype), h)
    if not np.array_equal(w[0, :, -1], expected):
        raise ExportError(
            f"LSTM op {node.name!r}: W's last column is not the pad flag's (graphs."
            "NativeOnnxLSTM); this is a bug in lstm-deploy's export, please report it"
        )
    w[:, :, -1] = 0.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # quantize_dynamic logs a warning through the root logger on every call (to run its
    # pre-processing: shape inference and graph optimisation, which this graph, quantized in its
    # LSTM ops only, does not need). A handler keeps logging from installing its default one.
    root = logging.getLogger()
    level, handler = root.level, logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(handler)
