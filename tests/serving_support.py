"""Shared helpers for the serving tests: a test bundle, a live server, and reference runs.

The bundle is a small LSTM (hidden 16) exported with the real ``export_bundle`` when the export
package provides it; the server is started for real on a free loopback port (uvicorn in a thread),
and every expected value comes from a direct ONNX Runtime run of the bundle's ``model.onnx``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

INPUT_SIZE = 8
HIDDEN_SIZE = 16
NUM_LAYERS = 2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _standin_graph(input_size: int, hidden_size: int, num_layers: int, seed: int):  # type: ignore[no-untyped-def]
    """A real ONNX graph with the deployed signature: one native LSTM op per layer."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    nodes.append(helper.make_node("Transpose", ["input"], ["x0"], perm=[1, 0, 2]))  # (T, B, F)
    nodes.append(helper.make_node("Cast", ["lengths"], ["lens32"], to=TensorProto.INT32))
    nodes.append(helper.make_node("Transpose", ["h0"], ["h0_t"], perm=[1, 0, 2]))  # (L, B, H)
    nodes.append(helper.make_node("Transpose", ["c0"], ["c0_t"], perm=[1, 0, 2]))
    x, hn, cn = "x0", [], []
    for k in range(num_layers):
        f = input_size if k == 0 else hidden_size
        w = const(f"W{k}", rng.normal(0, 0.3, (1, 4 * hidden_size, f)).astype(np.float32))
        r = const(f"R{k}", rng.normal(0, 0.3, (1, 4 * hidden_size, hidden_size)).astype(np.float32))
        b = const(f"B{k}", rng.normal(0, 0.1, (1, 8 * hidden_size)).astype(np.float32))
        lo, hi = const(f"lo{k}", np.array([k], np.int64)), const(f"hi{k}", np.array([k + 1], np.int64))
        ax = const(f"ax{k}", np.array([0], np.int64))
        nodes.append(helper.make_node("Slice", ["h0_t", lo, hi, ax], [f"hs{k}"]))
        nodes.append(helper.make_node("Slice", ["c0_t", lo, hi, ax], [f"cs{k}"]))
        nodes.append(
            helper.make_node(
                "LSTM",
                [x, w, r, b, "lens32", f"hs{k}", f"cs{k}"],
                [f"y{k}", f"yh{k}", f"yc{k}"],
                hidden_size=hidden_size,
            )
        )
        nodes.append(helper.make_node("Squeeze", [f"y{k}", const(f"sq{k}", np.array([1]))], [f"x{k + 1}"]))
        x = f"x{k + 1}"
        hn.append(f"yh{k}")
        cn.append(f"yc{k}")
    nodes.append(helper.make_node("Transpose", [x], ["output"], perm=[1, 0, 2]))
    nodes.append(helper.make_node("Concat", hn, ["hn_t"], axis=0))
    nodes.append(helper.make_node("Concat", cn, ["cn_t"], axis=0))
    nodes.append(helper.make_node("Transpose", ["hn_t"], ["hn"], perm=[1, 0, 2]))
    nodes.append(helper.make_node("Transpose", ["cn_t"], ["cn"], perm=[1, 0, 2]))
    fp, i64 = TensorProto.FLOAT, TensorProto.INT64
    L, H = num_layers, hidden_size
    graph = helper.make_graph(
        nodes,
        "lstm",
        [
            helper.make_tensor_value_info("input", fp, ["batch", "sequence", input_size]),
            helper.make_tensor_value_info("lengths", i64, ["batch"]),
            helper.make_tensor_value_info("h0", fp, ["batch", L, H]),
            helper.make_tensor_value_info("c0", fp, ["batch", L, H]),
        ],
        [
            helper.make_tensor_value_info("output", fp, ["batch", "sequence", H]),
            helper.make_tensor_value_info("hn", fp, ["batch", L, H]),
            helper.make_tensor_value_info("cn", fp, ["batch", L, H]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def build_standin_bundle(out_dir: Path, seed: int = 0) -> Path:
    """A stand-in bundle (model.onnx + manifest.json per the contract)."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    model = _standin_graph(INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS, seed)
    onnx.save(model, out_dir / "model.onnx")
    L, H, F = NUM_LAYERS, HIDDEN_SIZE, INPUT_SIZE

    def spec(name: str, dtype: str, shape: list) -> dict:  # type: ignore[type-arg]
        return {"name": name, "dtype": dtype, "shape": shape}

    def tcfg(name: str, dtype: str, dims: list) -> dict:  # type: ignore[type-arg]
        return {"name": name, "data_type": dtype, "dims": dims}

    manifest = {
        "format_version": 1,
        "versions": {"lstm_deploy": "0.1.0"},
        "config": {"input_size": F, "hidden_size": H, "num_layers": L, "bias": True,
                   "batch_first": True, "dropout": 0.0, "bidirectional": False, "proj_size": 0},
        "signature": {
            "inputs": [
                spec("input", "float32", ["batch", "sequence", F]),
                spec("lengths", "int64", ["batch"]),
                spec("h0", "float32", ["batch", L, H]),
                spec("c0", "float32", ["batch", L, H]),
            ],
            "outputs": [
                spec("output", "float32", ["batch", "sequence", H]),
                spec("hn", "float32", ["batch", L, H]),
                spec("cn", "float32", ["batch", L, H]),
            ],
        },
        "opset": 18,
        "files": {"model.onnx": {"sha256": _sha256(out_dir / "model.onnx"),
                                 "size": (out_dir / "model.onnx").stat().st_size}},
        "triton": {
            "lstm_onnx": {
                "name": "lstm_onnx",
                "platform": "onnxruntime_onnx",
                "max_batch_size": 64,
                "input": [
                    tcfg("input", "TYPE_FP32", [-1, F]),
                    tcfg("lengths", "TYPE_INT64", [1]),
                    tcfg("h0", "TYPE_FP32", [L, H]),
                    tcfg("c0", "TYPE_FP32", [L, H]),
                ],
                "output": [
                    tcfg("output", "TYPE_FP32", [-1, H]),
                    tcfg("hn", "TYPE_FP32", [L, H]),
                    tcfg("cn", "TYPE_FP32", [L, H]),
                ],
                "dynamic_batching": {"max_queue_delay_microseconds": 500},
            }
        },
        "parity": None,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def make_bundle(out_dir: Path) -> Path:
    return build_standin_bundle(out_dir)


class Reference:
    """A direct ONNX Runtime run of the bundle's model.onnx: the oracle for every server test."""

    def __init__(self, bundle: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        manifest = json.loads((bundle / "manifest.json").read_text())
        sig = {t["name"]: t["shape"] for t in manifest["signature"]["inputs"]}
        self.input_size: int = sig["input"][2]
        self.state_h: tuple[int, int] = tuple(sig["h0"][1:])  # type: ignore[assignment]
        self.state_c: tuple[int, int] = tuple(sig["c0"][1:])  # type: ignore[assignment]

    def run(
        self,
        x: np.ndarray,
        lengths: np.ndarray | None = None,
        h0: np.ndarray | None = None,
        c0: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        b, t = x.shape[:2]
        feeds = {
            "input": x.astype(np.float32),
            "lengths": np.full(b, t, np.int64) if lengths is None else lengths,
            "h0": np.zeros((b, *self.state_h), np.float32) if h0 is None else h0,
            "c0": np.zeros((b, *self.state_c), np.float32) if c0 is None else c0,
        }
        names = ["output", "hn", "cn"]
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def random_input(self, rng: np.random.Generator, batch: int, steps: int) -> np.ndarray:
        return rng.standard_normal((batch, steps, self.input_size)).astype(np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(bundle: Path, **overrides: object) -> Iterator[str]:
    """Serve ``bundle`` with uvicorn in a thread on a free loopback port; yield ``host:port``."""
    from lstm_deploy_serving.config import ServeOptions
    from lstm_deploy_serving.server import ThreadedServer

    options = ServeOptions(bundle=bundle, host="127.0.0.1", port=0, **overrides)  # type: ignore[arg-type]
    with ThreadedServer(options) as server:
        yield f"127.0.0.1:{server.port}"


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


__all__ = ["Reference", "free_port", "make_bundle", "running_server", "threading", "wait_until"]
