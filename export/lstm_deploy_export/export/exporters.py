"""Exporters: TorchScript (torch.jit.script) and ONNX (torch.onnx.export(dynamo=True))."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from lstm_deploy._ready import make_ready
from lstm_deploy.bundle import BATCH, INPUT, LENGTHS, SEQUENCE, Signature, lstm_signature
from lstm_deploy.model import LSTM
from lstm_deploy.versions import package_version
from lstm_deploy_export.export.graphs import (
    DeployLSTM,
    ExportError,
    NativeOnnxLSTM,
    ScanOnnxLSTM,
)

OPSET = 18
FORBIDDEN_OPS = frozenset({"Loop", "SequenceEmpty", "SequenceConstruct", "ConcatFromSequence"})
GRAPHS: dict[str, type[nn.Module]] = {"lstm": NativeOnnxLSTM, "scan": ScanOnnxLSTM}


def example_inputs(model: LSTM, batch: int = 2, steps: int = 3) -> tuple[torch.Tensor, ...]:
    """Inputs of the deployed signature: random input, full lengths, zero state.

    Batch 2 and 3 steps: sizes that no test or user shape depends on (1 would be specialised).
    """
    p = next(model.parameters())
    tensors = []
    for spec in lstm_signature(model.config).inputs:
        shape = spec.concrete({BATCH: batch, SEQUENCE: steps})
        if spec.name == LENGTHS:
            tensors.append(torch.full(shape, steps, dtype=torch.int64))
        elif spec.name == INPUT:
            tensors.append(torch.randn(shape, dtype=p.dtype))
        else:
            tensors.append(torch.zeros(shape, dtype=p.dtype))
    return tuple(tensors)


def export_torchscript(model: LSTM, path: str | Path, onednn_from_batch: int | None = None) -> Path:
    """`model.pt`: the scratch module scripted (not traced) behind the deployed signature.

    Its copy of the model gets `ReadyWeights` (lstm_deploy._ready): the weights laid out for the
    no-grad loop, derived again on load rather than stored, and the GEMMs' route by batch size:
    oneDNN from `onednn_from_batch` on (0: never), MKL below; None measures where oneDNN is
    faster on this machine (`choose_onednn_from_batch`).
    """
    deploy = DeployLSTM(model)
    make_ready(deploy.lstm, onednn_from_batch)
    scripted = torch.jit.script(deploy)
    torch.jit.save(scripted, str(path))
    return Path(path)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The dynamo exporter warns and logs about its own internals (torchvision ops it skips, pytree
    # deprecations, unused axis names): nothing a user of this package can act on.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: LSTM, path: str | Path, kind: str = "lstm") -> Path:
    """`model.onnx` (kind "lstm": native LSTM ops) or `model.scan.onnx` (kind "scan")."""
    if kind not in GRAPHS:
        raise ValueError(f"unknown ONNX graph kind {kind!r}; expected one of {sorted(GRAPHS)}")
    module = GRAPHS[kind](model).eval()
    sig = lstm_signature(model.config)
    batch, seq = torch.export.Dim(BATCH), torch.export.Dim(SEQUENCE)
    dynamic = {
        t.name: {
            i: (batch if s == BATCH else seq) for i, s in enumerate(t.shape) if isinstance(s, str)
        }
        for t in sig.inputs
    }
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            example_inputs(model),
            dynamo=True,
            input_names=sig.input_names,
            output_names=sig.output_names,
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            verbose=False,
        )
    props = {"lstm_deploy.config": json.dumps(model.config.to_dict()), "lstm_deploy.graph": kind}
    return save_onnx(program, sig, path, props)


def save_onnx(program: Any, sig: Signature, path: str | Path, props: dict[str, str]) -> Path:
    """Write torch.onnx.export's `program` to `path`: unused constants dropped, the dynamic axes
    named as `sig` names them, lstm-deploy's version and `props` as metadata, checked
    (`check_onnx`)."""
    if program is None:  # only with dynamo=False; named here for the type checker
        raise ExportError(f"torch.onnx.export returned no program for {path}")
    proto = program.model_proto
    _drop_unused_initializers(proto)
    _name_dynamic_axes(proto, sig)
    onnx.helper.set_model_props(proto, {"lstm_deploy.version": package_version(), **props})
    check_onnx(proto)
    onnx.save(proto, str(path))
    return Path(path)


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    # The exporter can leave constants that no node reads; ONNX Runtime warns about each one on
    # every session it creates (a serving log line per model load).
    used = {name for node in _nodes(proto.graph.node) for name in node.input}
    used |= {value.name for value in proto.graph.output}
    unused = [init for init in proto.graph.initializer if init.name not in used]
    for init in unused:
        proto.graph.initializer.remove(init)


def _nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """Every node, and every node of their subgraphs (a Scan body reads outer initializers)."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g.node)
            for g in attr.graphs:
                yield from _nodes(g.node)


def _name_dynamic_axes(proto: onnx.ModelProto, sig: Signature) -> None:
    # The exporter names each dynamic axis after one of the inputs that share it; name them all
    # "batch" and "sequence", as the signature (and every consumer of the graph) does.
    specs = {t.name: t for t in (*sig.inputs, *sig.outputs)}
    for value in (*proto.graph.input, *proto.graph.output):
        spec = specs[value.name]
        for dim, s in zip(value.type.tensor_type.shape.dim, spec.shape):
            if isinstance(s, str):
                dim.dim_param = s
            else:
                dim.dim_value = s


def check_onnx(proto: onnx.ModelProto) -> None:
    """The checker's full check, and none of the ops that TensorRT cannot load.

    Raises ExportError (which the CLI reports in one line) for either.
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported ONNX graph is not valid: {e}") from None
    found = FORBIDDEN_OPS & op_types(proto)
    if found:
        raise ExportError(
            f"the ONNX graph contains {sorted(found)}, which TensorRT cannot load; this is a "
            "bug in lstm-deploy's export: please report it with the model's config"
        )


def op_types(proto: onnx.ModelProto) -> set[str]:
    """Every op type in the graph, its subgraphs and its local functions."""
    functions = (node for f in proto.functions for node in f.node)
    return {node.op_type for node in _nodes(itertools.chain(proto.graph.node, functions))}
