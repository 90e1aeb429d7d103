"""Triton python-backend model: the bundle's ``model.onnx`` on ONNX Runtime, batched as we batch.

This file is the ``1/model.py`` of the bundle's ``lstm_python`` and ``lstm_python_stateful``
models (``lstm-deploy export`` copies it there); it runs only inside Triton's python backend
stub, which provides ``triton_python_backend_utils``. Beside it the export copies the numpy-only
modules of ``lstm_deploy_serving`` it uses, so the repository needs no lstm-deploy installed where
Triton runs: only numpy and onnxruntime in the stub's Python.

What it knows of the model is the bundle's ``ModelInfo``, which the export writes as JSON into
the config's parameter ``model_info``, read here as a ``batching.Layout`` (as our server reads the
bundle's). Triton hands ``execute`` every request of a batch as its own request; those that can
share a run (``Layout.groups``: any lengths where the model takes lengths, else equal shapes) are
merged into one ONNX Runtime run with the server's batching core (``fill_defaults``, ``merge``,
``split``). With ``sequence_batching`` in the config (the stateful model), Triton's sequence
batcher adds the control inputs START, END and CORRID to each request, and a ``SequenceStore``
keeps every live sequence's state (each LSTM's ``(h, c)``) between its requests, as our server
does for ``sequence_id``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# The copy of lstm_deploy_serving beside this file comes first: it is the code the bundle was
# exported with, whatever else the stub's Python has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lstm_deploy_serving.batching import Layout
from lstm_deploy_serving.errors import BadRequest, ServingError
from lstm_deploy_serving.sequences import SequenceStore, initial_state

ONNX_FILE = "model.onnx"
MODEL_INFO_PARAMETER = "model_info"  # export/triton.py's


def _error(e: Exception) -> Any:
    """A TritonError with the code that maps to the HTTP status our server would answer."""
    status = e.status if isinstance(e, ServingError) else 500
    message = str(e) if isinstance(e, ServingError) else f"{type(e).__name__}: {e}"
    codes = {400: "INVALID_ARG", 503: "UNAVAILABLE"}
    code = getattr(pb_utils.TritonError, codes.get(status, "INTERNAL"), None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


@dataclass
class _Item:
    """One request: its place in the batch, its inputs, and for a sequence (id, start, end)."""

    index: int
    inputs: dict[str, np.ndarray]
    seq: tuple[int, bool, bool] | None


class TritonPythonModel:
    """Triton's python-backend entry points: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.name = config["name"]
        info = config["parameters"][MODEL_INFO_PARAMETER]["string_value"]
        self.layout = Layout.from_json(json.loads(info))
        self.output_names = [t["name"] for t in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / ONNX_FILE
        # The runtime is an explicit choice: CPU, as the python backend's instance_group.
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.sequences: SequenceStore | None = None
        batcher = config.get("sequence_batching")
        if batcher is not None:
            idle_us = int(batcher.get("max_sequence_idle_microseconds") or 1_000_000)
            cap = int((batcher.get("oldest") or {}).get("max_candidate_sequences") or 1024)
            # Triton frees an idle sequence without telling the model: the store forgets it
            # after the same idle time. Room for twice Triton's live cap, so that a sequence
            # Triton timed out can never push out one it still runs.
            self.sequences = SequenceStore(
                self.layout.zero_state, max_sequences=2 * cap, idle_timeout_s=idle_us / 1e6
            )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        items: list[_Item] = []
        for index, request in enumerate(requests):
            try:
                items.append(_Item(index, *self._read(request)))
            except Exception as e:
                responses[index] = pb_utils.InferenceResponse(error=_error(e))
        # One merged run per round; a round holds each sequence at most once (its chunks in order).
        while items:
            seen: set[int] = set()
            this_round, items_left = [], []
            for item in items:
                key = item.seq[0] if item.seq is not None else None
                if key is not None and key in seen:
                    items_left.append(item)
                    continue
                if key is not None:
                    seen.add(key)
                this_round.append(item)
            self._run(this_round, requests, responses)
            items = items_left
        return responses

    def finalize(self) -> None:
        self.sequences = None

    # -- one request ---------------------------------------------------------------------------

    def _read(self, request: Any) -> tuple[dict[str, np.ndarray], tuple[int, bool, bool] | None]:
        """The request's inputs (present ones only) and its sequence control values."""
        tensors = {}
        for spec in self.layout.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                continue
            value = tensor.as_numpy()
            # A [batch] input is [batch, 1] on the wire; [batch] with the config's reshape.
            tensors[spec.name] = value.reshape(-1) if len(spec.shape) == 1 else value
        missing = [n for n in self.layout.required if n not in tensors]
        if missing:
            raise BadRequest(f"expected input '{missing[0]}' for model '{self.name}', got none")
        self.layout.check(tensors)
        if self.sequences is None:
            return tensors, None
        control = {
            name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
            for name in ("START", "END", "CORRID")
        }
        if self.layout.rows(tensors) != 1:
            raise BadRequest("a request of a sequence (sequence_id) must have batch size 1")
        start = bool(control["START"][0])
        initial_state(tensors, self.layout.state_inputs, start)
        return tensors, (int(control["CORRID"][0]), start, bool(control["END"][0]))

    # -- merged runs ---------------------------------------------------------------------------

    def _run(self, items: list[_Item], requests: list[Any], responses: list[Any]) -> None:
        live: list[tuple[_Item, dict[str, np.ndarray]]] = []
        for item in items:
            inputs = item.inputs
            try:
                if item.seq is not None:
                    assert self.sequences is not None
                    seq_id, start, _ = item.seq
                    given = initial_state(inputs, self.layout.state_inputs, start)
                    inputs = {**inputs, **self.sequences.acquire(seq_id, start, given)}
                live.append((item, self.layout.fill_defaults(inputs)))
            except Exception as e:
                responses[item.index] = pb_utils.InferenceResponse(error=_error(e))
        for group in self.layout.groups([inputs for _, inputs in live]):
            self._run_group([live[i] for i in group], requests, responses)

    def _run_group(
        self,
        live: list[tuple[_Item, dict[str, np.ndarray]]],
        requests: list[Any],
        responses: list[Any],
    ) -> None:
        """One ONNX Runtime run for requests that can share it (``Layout.groups``)."""
        try:
            merged, plan = self.layout.merge([inputs for _, inputs in live])
            values = self.session.run(self.output_names, merged)
            results = self.layout.split(dict(zip(self.output_names, values, strict=True)), plan)
        except Exception as e:
            for item, _ in live:
                if item.seq is not None and self.sequences is not None:
                    self.sequences.cancel(item.seq[0])
                responses[item.index] = pb_utils.InferenceResponse(error=_error(e))
            return
        for (item, _), outputs in zip(live, results, strict=True):
            if item.seq is not None and self.sequences is not None:
                self.sequences.release(item.seq[0], self.layout.carried(outputs), end=item.seq[2])
            wanted = requests[item.index].requested_output_names() or self.output_names
            responses[item.index] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(outputs[name]))
                    for name in self.output_names
                    if name in wanted
                ]
            )
