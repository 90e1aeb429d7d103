"""The bundle's Triton model repository: configs as data, rendered to `config.pbtxt`.

Each config is a dict in the JSON form of Triton's ModelConfig (what Triton's
`GET /v2/models/{m}/config` returns); the manifest keeps the dicts and our server serves them.

The repository holds these models over the same weights:

- `lstm_onnx` (onnxruntime backend) and `lstm_torchscript` (libtorch backend): for NVIDIA's
  Triton container, CPU or GPU; `lstm_onnx_int8` (onnxruntime backend): `model.int8.onnx`, whose
  DynamicQuantizeLSTM ops run on the CPU only;
- `lstm_python` and `lstm_python_stateful` (python backend): `model.onnx` run by ONNX Runtime
  inside Triton's python backend, batched with `lstm_deploy_serving.batching` as our server
  batches (requests of different lengths merged by padding where the model takes lengths, else
  only requests of equal shapes) and, in the stateful one, every LSTM's `(h, c)` kept per
  correlation id with `lstm_deploy_serving.sequences`. They run on any Triton whose python
  backend has numpy and onnxruntime (the `nvidia-pytriton` wheel's, which has no onnxruntime or
  libtorch backend, and which `lstm-deploy triton` starts).

Every config comes from the bundle's `ModelInfo` (an LSTM bundle's or a whole model's alike): the
tensors from its signature, the python models' optional inputs from its lengths and states, the
stateful model only where it is streamable. The python models' `model.py` reads the same
`ModelInfo`, as JSON (`dataclasses.asdict`), from their config's parameter `model_info`.

Beside the repository, `kserve/inferenceservice.yaml` serves it on KServe.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from lstm_deploy.bundle import (
    BATCH,
    INT8_ONNX,
    KSERVE_DIR,
    ONNX,
    SEQUENCE,
    TORCHSCRIPT,
    TRITON_DTYPES,
    ModelInfo,
    Signature,
    TensorSpec,
)

INT8_MODEL = "lstm_onnx_int8"  # model.int8.onnx on the onnxruntime backend
MAX_BATCH_SIZE = 64
MAX_QUEUE_DELAY_US = 500
MAX_SEQUENCE_IDLE_US = 60_000_000
MAX_CANDIDATE_SEQUENCES = 64
KSERVE_MANIFEST = f"{KSERVE_DIR}/inferenceservice.yaml"  # relative to the bundle, beside triton/
# The image tag that the manifest's runtimeVersion puts on KServe's kserve-tritonserver runtime.
# Its default, nvcr.io/nvidia/tritonserver:23.05-py3 (kserve/kserve v0.20.0,
# config/runtimes/kustomization.yaml), has ONNX Runtime 1.15.0, which reads ONNX IR <= 9: it
# rejects our model.onnx (IR 10, opset 18). Triton 24.10 (server v2.51.0, build.py) has ONNX
# Runtime 1.19.2, which reads IR 10 and opsets <= 21 (onnxruntime.ai/docs/reference/
# compatibility.html), and its libtorch is the NGC PyTorch 24.10 container's, 2.5.0a0+e000cf0:
# model.pt, saved by torch 2.13, is TorchScript file format 3 with only long-standing aten ops,
# which that libtorch reads. The same image as README's docker example. Checked once by hand on
# a bundle: onnxruntime 1.19.2 and torch 2.5.0 load its model.onnx and model.pt and match torch
# 2.13's outputs; onnxruntime 1.15.0 refuses the model (IR 10).
KSERVE_TRITON_VERSION = "24.10-py3"
# The python backend's model.py, and the numpy-only modules of lstm_deploy_serving it imports:
# copied beside it, so the repository needs no lstm-deploy installed where Triton runs.
PYTHON_MODEL_SOURCE = "triton_model.py"
SERVING_MODULES = ("batching.py", "errors.py", "sequences.py")
MODEL_INFO_PARAMETER = "model_info"  # the python models' ModelInfo, as JSON
_ENUM_FIELDS = frozenset({"data_type", "kind"})
_MAP_FIELDS = frozenset({"parameters"})  # protobuf maps: `key` and `value` in text format


def _tensor(spec: TensorSpec, name: str | None = None) -> dict[str, Any]:
    # With max_batch_size > 0 Triton's dims leave out the batch axis; dynamic axes are -1.
    assert spec.shape[0] == BATCH, spec
    dims = spec.wire_shape[1:]
    entry: dict[str, Any] = {"name": name or spec.name, "data_type": TRITON_DTYPES[spec.dtype]}
    if dims:
        entry["dims"] = dims
    else:  # a [batch] tensor: Triton needs non-empty dims, so [1] reshaped away
        entry["dims"] = [1]
        entry["reshape"] = {"shape": []}
    return entry


def onnx_config(sig: Signature, name: str = "lstm_onnx") -> dict[str, Any]:
    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": MAX_BATCH_SIZE,
        "input": [_tensor(t) for t in sig.inputs],
        "output": [_tensor(t) for t in sig.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": MAX_QUEUE_DELAY_US},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    }


def torchscript_names(sig: Signature) -> dict[str, str]:
    """The libtorch backend's positional names (INPUT__n / OUTPUT__n) for each signature name."""
    names = {t.name: f"INPUT__{i}" for i, t in enumerate(sig.inputs)}
    names.update({t.name: f"OUTPUT__{i}" for i, t in enumerate(sig.outputs)})
    return names


def torchscript_config(sig: Signature, name: str = "lstm_torchscript") -> dict[str, Any]:
    names = torchscript_names(sig)
    return {
        "name": name,
        "platform": "pytorch_libtorch",
        "max_batch_size": MAX_BATCH_SIZE,
        "input": [_tensor(t, names[t.name]) for t in sig.inputs],
        "output": [_tensor(t, names[t.name]) for t in sig.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": MAX_QUEUE_DELAY_US},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    }


def python_config(info: ModelInfo, name: str = "lstm_python") -> dict[str, Any]:
    """The python-backend model: ONNX Runtime in Triton's python backend, dynamically batched.

    As on our server, the lengths input (full length) and the state inputs (zeros) are optional.
    Where the model takes lengths, its inputs with a `sequence` axis allow ragged batches: the
    python backend gets each request on its own, so Triton may hand it requests of different
    lengths at once, and model.py pads them together. (Triton batches together only requests
    that carry the same optional inputs.) Without lengths, Triton batches equal shapes only.
    """
    optional = {*((info.lengths,) if info.lengths else ()), *info.state_inputs}
    inputs = [_tensor(t) for t in info.signature.inputs]
    for spec, entry in zip(info.signature.inputs, inputs, strict=True):
        if spec.name in optional:
            entry["optional"] = True
        elif info.lengths is not None and SEQUENCE in spec.shape:
            entry["allow_ragged_batch"] = True
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": MAX_BATCH_SIZE,
        "input": inputs,
        "output": [_tensor(t) for t in info.signature.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": MAX_QUEUE_DELAY_US},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {
            MODEL_INFO_PARAMETER: {"string_value": json.dumps(dataclasses.asdict(info))}
        },
    }


def _control(name: str, kind: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "control": [{"kind": kind, **fields}]}


def python_stateful_config(info: ModelInfo, name: str = "lstm_python_stateful") -> dict[str, Any]:
    """The python-backend model with Triton's sequence batcher: each LSTM's `(h, c)` kept per
    sequence.

    Triton turns a request's `sequence_id`/`sequence_start`/`sequence_end` into the control
    inputs START, END (int32 0/1) and CORRID (uint64); model.py keeps each correlation id's state
    from one request to the next and frees it at END. The oldest-first strategy runs chunks of
    different sequences together in one batch, each sequence's chunks in order.
    """
    config = python_config(info, name)
    del config["dynamic_batching"]
    config["sequence_batching"] = {
        "max_sequence_idle_microseconds": MAX_SEQUENCE_IDLE_US,
        "control_input": [
            _control("START", "CONTROL_SEQUENCE_START", int32_false_true=[0, 1]),
            _control("END", "CONTROL_SEQUENCE_END", int32_false_true=[0, 1]),
            _control("CORRID", "CONTROL_SEQUENCE_CORRID", data_type="TYPE_UINT64"),
        ],
        "oldest": {
            "max_candidate_sequences": MAX_CANDIDATE_SEQUENCES,
            "max_queue_delay_microseconds": MAX_QUEUE_DELAY_US,
        },
    }
    return config


def _serving_package() -> Path:
    # Located, not imported: lstm_deploy_export does not depend on lstm_deploy_serving, but both
    # ship in the one lstm-deploy distribution, so the source files are always there.
    spec = importlib.util.find_spec("lstm_deploy_serving")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "lstm_deploy_serving is not installed: reinstall lstm-deploy (its wheel ships it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _write_python_model(version_dir: Path) -> None:
    package = _serving_package()
    shutil.copyfile(package / PYTHON_MODEL_SOURCE, version_dir / "model.py")
    vendored = version_dir / "lstm_deploy_serving"
    vendored.mkdir(exist_ok=True)
    for module in SERVING_MODULES:
        shutil.copyfile(package / module, vendored / module)
    # Not the package's own __init__ (it imports more than these modules): model.py imports
    # the modules by name.
    (vendored / "__init__.py").write_text(
        '"""The numpy-only modules of lstm_deploy_serving that model.py uses (a copy)."""\n'
    )


def kserve_manifest(configs: dict[str, dict[str, Any]], name: str = "lstm") -> str:
    """A KServe `InferenceService` (YAML) serving the repository with KServe's Triton runtime.

    It loads the onnxruntime and libtorch models only: NVIDIA's Triton image has those backends,
    and its python backend has no onnxruntime for the python-backend models. `modelFormat: triton`
    with protocol v2 auto-selects KServe's kserve-tritonserver ClusterServingRuntime, and
    `runtimeVersion` replaces its image tag with `KSERVE_TRITON_VERSION`.
    """
    loads = [n for n, c in configs.items() if c.get("backend") != "python"]
    args = ["--model-control-mode=explicit", *(f"--load-model={n}" for n in loads)]
    return "\n".join(
        [
            "# Generated by lstm-deploy: serves the Triton repository of the bundle on KServe.",
            "# Copy triton/ to object storage and point storageUri at it. For GPUs, set",
            "# instance_group { kind: KIND_GPU } in the models' config.pbtxt and uncomment the",
            '# nvidia.com/gpu limit. See README.md, "Scale out on Triton / KServe".',
            "apiVersion: serving.kserve.io/v1beta1",
            "kind: InferenceService",
            "metadata:",
            f"  name: {name}",
            "spec:",
            "  predictor:",
            "    model:",
            "      modelFormat:",
            "        name: triton",
            "      protocolVersion: v2",
            "      # The runtime's default Triton (23.05) cannot read model.onnx (ONNX IR 10).",
            f'      runtimeVersion: "{KSERVE_TRITON_VERSION}"',
            '      storageUri: "s3://YOUR-BUCKET/path/to/bundle/triton"',
            "      args:",
            *(f'        - "{a}"' for a in args),
            "      resources:",
            "        requests:",
            '          cpu: "1"',
            "          memory: 2Gi",
            "        limits:",
            '          cpu: "2"',
            "          memory: 4Gi",
            '          # nvidia.com/gpu: "1"',
            "",
        ]
    )


def to_pbtxt(config: dict[str, Any], header: str = "") -> str:
    """Protobuf text format for a ModelConfig dict (messages, repeated fields, enums, scalars)."""
    lines = [f"# {line}" for line in header.splitlines()]
    _render(config, lines, 0)
    return "\n".join(lines) + "\n"


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and key not in _ENUM_FIELDS:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _render(message: dict[str, Any], lines: list[str], depth: int) -> None:
    pad = "  " * depth
    for key, value in message.items():
        if key in _MAP_FIELDS:
            value = [{"key": k, "value": v} for k, v in value.items()]
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(v, dict) for v in items):
            for item in items:
                lines.append(f"{pad}{key} {{")
                _render(item, lines, depth + 1)
                lines.append(f"{pad}}}")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(key, v) for v in value)} ]")
        elif isinstance(value, dict):  # an empty message
            lines.append(f"{pad}{key} {{ }}")
        else:
            lines.append(f"{pad}{key}: {_scalar(key, value)}")


def write_repository(
    root: Path,
    info: ModelInfo,
    onnx_model: Path | None,
    torchscript_model: Path | None,
    int8_model: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Write `root/<model>/config.pbtxt` and `root/<model>/1/<files>`; return the configs by name.

    `info` is the bundle's `ModelInfo` (`Bundle.info`: an LSTM bundle's or a whole model's). The
    python-backend models come with `onnx_model`; the stateful one only if `info.streamable`: a
    bidirectional LSTM is not (its backward direction would have to run over steps that have not
    arrived yet). `int8_model` (model.int8.onnx) is served by the onnxruntime backend as
    `lstm_onnx_int8`, under the backend's default file name. Beside `root`, the KServe manifest
    for its onnxruntime and libtorch models: `root/../kserve/inferenceservice.yaml`.
    """
    sig = info.signature
    configs: dict[str, dict[str, Any]] = {}
    python_header = (
        "\nThe python backend runs 1/model.py (lstm_deploy_serving's triton_model.py) on"
        "\n1/model.onnx with ONNX Runtime: numpy and onnxruntime must be in its Python."
    )
    models = [
        (onnx_config(sig), onnx_model, ONNX, ""),
        (
            onnx_config(sig, INT8_MODEL),
            int8_model,
            ONNX,
            f"\n1/{ONNX} is the bundle's {INT8_ONNX}: its LSTM ops are ONNX Runtime's"
            "\nDynamicQuantizeLSTM (int8 weights), which runs on the CPU only.",
        ),
        (
            torchscript_config(sig),
            torchscript_model,
            TORCHSCRIPT,
            "\nThe libtorch backend names tensors by position:\n"
            + "\n".join(f"{n} = {t}" for t, n in torchscript_names(sig).items()),
        ),
        (python_config(info), onnx_model, ONNX, python_header),
        (
            python_stateful_config(info),
            onnx_model if info.streamable else None,
            ONNX,
            python_header,
        ),
    ]
    for config, source, filename, note in models:
        if source is None:
            continue
        model_dir = root / config["name"]
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, model_dir / "1" / filename)
        if config.get("backend") == "python":
            _write_python_model(model_dir / "1")
        header = f"Generated by lstm-deploy. Triton model configuration for {filename}." + note
        (model_dir / "config.pbtxt").write_text(to_pbtxt(config, header))
        configs[config["name"]] = config
    if any(c.get("backend") != "python" for c in configs.values()):
        kserve = root.parent / KSERVE_MANIFEST
        kserve.parent.mkdir(parents=True, exist_ok=True)
        kserve.write_text(kserve_manifest(configs))
    return configs
