"""What the server serves, from a bundle read through the contract (`lstm_deploy.bundle`).

Everything the server knows about the model comes from the manifest, alike for an LSTM bundle and
a whole-model bundle (``export_model``): the signature (names, dtypes, shapes with named dynamic
axes) and the ``ModelInfo`` beside it (which input carries lengths, integer inputs' ranges, the
LSTM states a stream carries, whether it may be streamed), which the batching core reads as a
``Layout``; and the Triton config of ``lstm_python``, the bundle's Triton model that this server
is to a client: the same ``model.onnx`` on ONNX Runtime, batched by the same code
(``batching.py``), with the same optional inputs (lengths and states). Its ``max_batch_size`` and
``dynamic_batching.max_queue_delay_microseconds`` are the server's defaults, ``GET .../config``
serves it, and the model metadata is derived from it by Triton's own rules (``metadata``), so
both read as Triton reads the same config: a [batch] input such as ``lengths``, declared as dims
``[1]``, is ``[-1, 1]``. ``load`` verifies the graph it serves (``model.onnx``, or
``model.int8.onnx``: ``serve --artifact``) against its sha256 and size before anything loads
it; the bundle's other artifacts are not read.

The manifest is not itself checksummed (it holds the checksums), so an edited signature passes
``load``; ``read_spec`` checks an LSTM bundle's against the manifest's own LSTM config, and
``check_graph`` every signature against the graph ONNX Runtime loaded, so that the server refuses
to start rather than answer every request with ONNX Runtime's error.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from lstm_deploy.bundle import (
    ARTIFACTS,
    BATCH,
    INT8_ONNX,
    MANIFEST,
    ONNX,
    TRITON_DTYPES,
    Bundle,
    BundleError,
    ModelInfo,
    Signature,
    TensorSpec,
    load_bundle,
    lstm_signature,
)

from .batching import Layout

TRITON_MODEL = "lstm_python"  # the key of the served model's config in manifest["triton"]
SERVED_ARTIFACTS = (ONNX, INT8_ONNX)  # the graphs `serve --artifact` runs, one signature
# Triton's wire datatype of a config data_type: the enum without its prefix, but for strings.
_WIRE_TYPES = {"TYPE_STRING": "BYTES"}


@dataclass(frozen=True)
class ModelSpec(Signature):
    """The signature (inputs, outputs), its ModelInfo and Layout, and the served Triton config."""

    triton_config: dict[str, Any]
    info: ModelInfo
    layout: Layout

    @property
    def streamable(self) -> bool:
        """Whether chunks of a sequence may come in separate requests, each LSTM's (h, c) kept
        between them: not for a bidirectional LSTM, whose backward direction starts at the
        sequence's last step, nor for a model that does not declare it."""
        return self.info.streamable

    @property
    def max_batch_size(self) -> int:
        return int(self.triton_config.get("max_batch_size", 0))

    @property
    def max_queue_delay_us(self) -> int:
        batching = self.triton_config.get("dynamic_batching") or {}
        return int(batching.get("max_queue_delay_microseconds", 0))

    @property
    def required(self) -> tuple[str, ...]:
        """The inputs a request must send: all but lengths (full length) and states (zeros)."""
        return self.layout.required

    @cached_property
    def _wire_shapes(self) -> dict[str, tuple[int, ...]]:
        batch = (-1,) if self.max_batch_size > 0 else ()
        config = self.triton_config
        return {
            t["name"]: (*batch, *(int(d) for d in t["dims"]))
            for t in (*config["input"], *config["output"])
        }

    def wire_shape(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape as Triton presents it: the batch axis, then the config's dims
        (before any ``reshape``), -1 where dynamic. ``lengths`` is ``(-1, 1)``."""
        return self._wire_shapes[name]

    @cached_property
    def input_specs(self) -> dict[str, TensorSpec]:
        """The signature's inputs by name."""
        return {t.name: t for t in self.inputs}

    @cached_property
    def output_specs(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.outputs}

    @cached_property
    def dynamic_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each input's signature shape, -1 for a dynamic axis (``TensorSpec.wire_shape``)."""
        return {t.name: tuple(t.wire_shape) for t in self.inputs}

    def metadata(self, name: str, versions: list[str]) -> dict[str, Any]:
        """The KServe v2 model metadata, derived from the config as Triton derives it: platform
        (or, where the config names a backend instead, the backend), datatypes, wire shapes."""

        def tensors(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                {
                    "name": t["name"],
                    "datatype": _WIRE_TYPES.get(t["data_type"], t["data_type"][len("TYPE_") :]),
                    "shape": list(self.wire_shape(t["name"])),
                }
                for t in entries
            ]

        config = self.triton_config
        return {
            "name": name,
            "versions": versions,
            "platform": config.get("platform") or config.get("backend", ""),
            "inputs": tensors(config["input"]),
            "outputs": tensors(config["output"]),
        }


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the fields Triton fills in when it loads a model, where they hold here:
    one version served, one instance per group (named as Triton names them), and batches formed
    up to ``max_batch_size`` (Triton's default ``preferred_batch_size``)."""
    config = copy.deepcopy(config)
    config.setdefault("version_policy", {"latest": {"num_versions": 1}})
    batching = config.get("dynamic_batching")
    if batching is not None and config.get("max_batch_size", 0) > 0:
        batching.setdefault("preferred_batch_size", [config["max_batch_size"]])
    for i, group in enumerate(config.get("instance_group", [])):
        group.setdefault("name", f"{config['name']}_{i}")
    return config


def layout_of(info: ModelInfo) -> Layout:
    """The batching core's view of ``info``: the same facts, as data (as the Triton model.py
    reads them from its config's parameters)."""
    return Layout.from_json(dataclasses.asdict(info))


def read_spec(bundle: Bundle) -> ModelSpec:
    """The served model's spec; BundleError if the bundle has no lstm_python config, if an LSTM
    bundle's signature disagrees with its LSTM config, or if the signature cannot be batched."""
    info = bundle.info
    sig = info.signature
    where = bundle.path / MANIFEST
    config = bundle.manifest.get("triton", {}).get(TRITON_MODEL)
    if not isinstance(config, dict):
        raise BundleError(
            f"{where}: triton.{TRITON_MODEL} is missing; re-export the bundle with the onnx "
            "artifact"
        )
    if not info.whole:
        problems = _differences(sig, "signature", lstm_signature(bundle.config), "config")
        if problems:
            raise BundleError(
                f"{where}: its signature and its LSTM config disagree: "
                + "; ".join(problems)
                + " (re-export the bundle)"
            )
    layout = layout_of(info)
    problems = _layout_problems(sig, layout)
    if problems:
        raise BundleError(f"{where}: the signature cannot be served: " + "; ".join(problems))
    return ModelSpec(sig.inputs, sig.outputs, dict(config), info, layout)


def _layout_problems(sig: Signature, layout: Layout) -> list[str]:
    """Every tensor batch first (servers batch on axis 0), and every dynamic axis of an output or
    an optional input sized by a required input (the response's and the defaults' sizes)."""
    problems = [
        f"'{t.name}' is {_text(t)}, not batch first"
        for t in (*sig.inputs, *sig.outputs)
        if not t.shape or t.shape[0] != BATCH
    ]
    given = {d for t in sig.inputs if t.name in layout.required for d in t.shape}
    for t in (*sig.inputs, *sig.outputs):
        for d in t.shape:
            if isinstance(d, str) and d not in given:
                problems.append(f"'{t.name}' has axis '{d}', which no required input has")
    return problems


def check_config(spec: ModelSpec, where: Path) -> None:
    """BundleError in one line naming every disagreement between the served Triton config (which
    the metadata is derived from) and the signature (which requests are run in): the same
    tensors in the same order, their dtypes, and the dims past the batch axis after ``reshape``.
    (Run after ``check_graph``: a manifest edited all through is first judged against the graph.)
    """
    problems = _config_differences(spec, spec.triton_config)
    if problems:
        raise BundleError(
            f"{where / MANIFEST}: triton.{TRITON_MODEL} and the signature disagree: "
            + "; ".join(problems)
            + " (re-export the bundle)"
        )


def _config_differences(sig: ModelSpec, config: dict[str, Any]) -> list[str]:
    optional = sig.layout.optional
    where = f"triton.{TRITON_MODEL}"
    if not isinstance(config.get("max_batch_size"), int) or config["max_batch_size"] < 1:
        return [f"{where}.max_batch_size must be >= 1 (the signature is batch first)"]
    problems = []
    for side, key in (("inputs", "input"), ("outputs", "output")):
        specs, entries = getattr(sig, side), config.get(key)
        if not isinstance(entries, list) or [
            t.get("name") if isinstance(t, dict) else None for t in entries
        ] != [t.name for t in specs]:
            problems.append(f"{where}.{key} does not list the signature's {side} in order")
            continue
        for spec, entry in zip(specs, entries, strict=True):
            dims = (entry.get("reshape") or {}).get("shape", entry.get("dims"))
            dtype = entry.get("data_type")
            if dtype != TRITON_DTYPES.get(spec.dtype) or dims != spec.wire_shape[1:]:
                problems.append(
                    f"{key} '{spec.name}': signature {_text(spec)}, {where} "
                    f"{dtype} dims {entry.get('dims')}"
                )
            elif key == "input" and bool(entry.get("optional")) != (spec.name in optional):
                problems.append(
                    f"input '{spec.name}': {where} marks it "
                    f"{'optional' if entry.get('optional') else 'required'}, the model does not"
                )
    return problems


class GraphTensor(Protocol):
    """A graph input or output as ONNX Runtime describes it (``session.get_inputs()``)."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[int | str | None]: ...


# ONNX Runtime's tensor types -> the manifest's dtypes.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _graph_spec(t: GraphTensor) -> TensorSpec:
    # A dynamic axis is a name (or None: unnamed) in ONNX Runtime; "?" stands for the unnamed.
    shape = tuple(d if isinstance(d, int) else d or "?" for d in t.shape)
    return TensorSpec(t.name, _ORT_DTYPES.get(t.type, t.type), shape)


def _text(t: TensorSpec) -> str:
    return f"{t.dtype} [{', '.join(str(d) for d in t.shape)}]"


def _agrees(manifest: TensorSpec, graph: TensorSpec) -> bool:
    """Same dtype and rank, and each of the graph's fixed dims fixed alike in the manifest."""
    return (
        manifest.dtype == graph.dtype
        and len(manifest.shape) == len(graph.shape)
        and all(not isinstance(g, int) or m == g for m, g in zip(manifest.shape, graph.shape))
    )


def _differences(
    a: Signature, a_name: str, b: Signature, b_name: str, exact: bool = True
) -> list[str]:
    problems = []
    for side in ("inputs", "outputs"):
        kind = side[:-1]
        ours = {t.name: t for t in getattr(a, side)}
        theirs = {t.name: t for t in getattr(b, side)}
        for name in ours.keys() - theirs.keys():
            problems.append(f"{a_name} has {kind} '{name}', {b_name} has none")
        for name in theirs.keys() - ours.keys():
            problems.append(f"{b_name} has {kind} '{name}', {a_name} has none")
        for name in ours.keys() & theirs.keys():
            mine, other = ours[name], theirs[name]
            if (mine != other) if exact else not _agrees(mine, other):
                problems.append(f"{kind} '{name}': {a_name} {_text(mine)}, {b_name} {_text(other)}")
    return sorted(problems)


def check_graph(
    spec: Signature,
    inputs: Sequence[GraphTensor],
    outputs: Sequence[GraphTensor],
    where: Path,
    artifact: str = ONNX,
) -> None:
    """BundleError in one line naming every disagreement between the manifest's signature and
    the graph's inputs and outputs (``where``: the bundle): names, dtypes, ranks, and the
    graph's fixed dims (a dim the graph leaves dynamic may be fixed in the manifest)."""
    graph = Signature(tuple(_graph_spec(t) for t in inputs), tuple(_graph_spec(t) for t in outputs))
    problems = _differences(spec, MANIFEST, graph, artifact, exact=False)
    if problems:
        raise BundleError(
            f"{where}: {MANIFEST} and {artifact} disagree: "
            + "; ".join(problems)
            + " (re-export the bundle, or restore its manifest)"
        )


def load(path: str | Path, artifact: str = ONNX) -> tuple[Bundle, ModelSpec]:
    """The bundle at ``path``, its ``artifact`` (one of ``SERVED_ARTIFACTS``) verified, and the
    spec of the model it serves (the same whichever graph runs: the signature is the bundle's)."""
    if artifact not in SERVED_ARTIFACTS:
        raise BundleError(f"cannot serve {artifact}: choose one of {', '.join(SERVED_ARTIFACTS)}")
    bundle = load_bundle(path, only=[])
    if not bundle.has(artifact):
        kind = next(k for k, f in ARTIFACTS.items() if f == artifact)
        kinds = kind if kind == "onnx" else f"onnx,{kind}"  # int8 is quantized from onnx
        raise BundleError(
            f"{bundle.path}: the bundle has no {artifact} (its manifest lists none): re-export it "
            f"with it (lstm-deploy export ... --artifacts {kinds}; the default has both), or "
            "serve another graph (--artifact)"
        )
    bundle.verify([artifact])
    return bundle, read_spec(bundle)
