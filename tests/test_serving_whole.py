"""Whole-model bundles (`export_model`) served: metadata, validation, batching and streaming read
from the bundle's signature and ModelInfo, on our server (tritonclient HTTP and gRPC) and on the
bundle's Triton python models (a real Triton, where its venv is installed).

Two models, each exported once with the real `export_model` (model.onnx only):

- a tagger, tokens int64 [batch, sequence] + lengths -> logits [batch, sequence, 7]: Embedding,
  a bidirectional LSTM, Linear. It declares its lengths input, so requests of any lengths merge
  (padded); its reference is torch.nn.LSTM with the same weights behind pack_padded_sequence;
- a detector, features float32 [batch, sequence, 40] -> prob [batch, sequence, 1]: a two-layer
  torch.nn.LSTM and a per-step head, streamable, without lengths: only equal shapes merge, and
  chunks carry the LSTM's (h, c) ("lstm.h0", "lstm.c0" in, "lstm.hn", "lstm.cn" out); its
  reference is the module itself, eager.

Every expected value comes from those torch modules and from a direct ONNX Runtime run of each
request alone on the bundle's model.onnx.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpc
import tritonclient.http as http
from google.protobuf import text_format
from lstm_deploy_export.export.whole import export_model
from lstm_deploy_export.tools.triton_server import TritonServer, check_repository, infer
from lstm_deploy_serving.batching import Layout
from lstm_deploy_serving.model_spec import layout_of
from lstm_deploy_serving.scheduler import DynamicBatcher
from serving_support import metrics, running_servers, triton_python
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

import lstm_deploy
from lstm_deploy.bundle import Bundle, ModelInfo, Signature, TensorSpec

ATOL = 1e-5
MODEL = "lstm_onnx"  # the server's default name
VOCAB, TAGS, FEATURES = 50, 7, 40
STATE = ("lstm.hn", "lstm.cn")


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.lstm: nn.Module = lstm_deploy.LSTM(8, 16, batch_first=True, bidirectional=True)
        self.head = nn.Linear(32, TAGS)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(tokens), lengths=lengths)
        return self.head(out)


class TorchTagger(Tagger):
    """The tagger's reference: the same parameters, torch.nn.LSTM over a PackedSequence."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True, bidirectional=True)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(
            self.emb(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = pad_packed_sequence(
            self.lstm(packed)[0], batch_first=True, total_length=tokens.shape[1]
        )
        return self.head(out)


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(features)
        return torch.sigmoid(self.head(out))


@dataclass
class Exported:
    bundle: Bundle
    reference: nn.Module  # eager torch

    @functools.cached_property
    def session(self) -> Any:
        import onnxruntime as ort

        path = self.bundle.path / "model.onnx"
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def alone(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """ONNX Runtime on model.onnx, this request alone, its defaults filled in here."""
        batch, steps = next(iter(inputs.values())).shape[:2]
        feeds = dict(inputs)
        for spec in self.bundle.signature.inputs:
            if spec.name in feeds:
                continue
            if spec.name == "lengths":
                feeds[spec.name] = np.full(batch, steps, np.int64)
            else:  # a state input
                feeds[spec.name] = np.zeros(spec.concrete({"batch": batch}), np.float32)
        return dict(zip(outputs, self.session.run(outputs, feeds), strict=True))

    def eager(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The torch module's outputs, by the signature's names."""
        with torch.no_grad():
            if "tokens" in inputs:
                tokens = torch.from_numpy(inputs["tokens"])
                full = np.full(tokens.shape[0], tokens.shape[1], np.int64)
                lengths = torch.from_numpy(inputs.get("lengths", full))
                return {"logits": self.reference(tokens, lengths).numpy()}
            x = torch.from_numpy(inputs["features"])
            _, (hn, cn) = self.reference.lstm(x)  # type: ignore[operator]
            return {
                "prob": self.reference(x).numpy(),
                "lstm.hn": hn.transpose(0, 1).numpy(),
                "lstm.cn": cn.transpose(0, 1).numpy(),
            }


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    torch.manual_seed(0)
    model = Tagger().eval()
    example = {"tokens": torch.randint(1, VOCAB, (2, 5)), "lengths": torch.tensor([5, 3])}
    out = tmp_path_factory.mktemp("whole") / "tagger"
    bundle = export_model(
        model,
        example,
        out,
        output_names=["logits"],
        input_ranges={"tokens": (0, VOCAB)},
        artifacts="onnx",
    )
    reference = TorchTagger().eval()
    reference.load_state_dict(model.state_dict())
    return Exported(bundle, reference)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    torch.manual_seed(1)
    model = Detector().eval()
    out = tmp_path_factory.mktemp("whole") / "detector"
    bundle = export_model(
        model,
        {"features": torch.randn(2, 5, FEATURES)},
        out,
        output_names=["prob"],
        streamable=True,
        artifacts="onnx",
    )
    return Exported(bundle, model)


@pytest.fixture(scope="module")
def tagger_urls(tagger: Exported) -> Iterator[tuple[str, str]]:
    # A 5 ms window so that merging does not hinge on the scheduling of a loaded test machine.
    with running_servers(tagger.bundle.path, max_queue_delay_us=5000) as urls:
        yield urls


@pytest.fixture(scope="module")
def detector_urls(detector: Exported) -> Iterator[tuple[str, str]]:
    with running_servers(detector.bundle.path, max_queue_delay_us=5000) as urls:
        yield urls


def _client(url: str, protocol: str) -> Any:
    return (grpc if protocol == "grpc" else http).InferenceServerClient(url)


async def _infer_all(
    url: str, requests: list[dict[str, np.ndarray]], outputs: list[str], model: str = MODEL
) -> list[dict[str, np.ndarray]]:
    """Every request in flight at once (tritonclient's asyncio HTTP client)."""
    import tritonclient.http.aio as aio

    client = aio.InferenceServerClient(url, conn_limit=len(requests))
    try:

        async def one(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            wire = []
            for name, value in inputs.items():
                array = np.ascontiguousarray(value.reshape(-1, 1) if value.ndim == 1 else value)
                item = aio.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                wire.append(item.set_data_from_numpy(array))
            result = await client.infer(model, wire)
            return {name: result.as_numpy(name) for name in outputs}

        return list(await asyncio.gather(*(one(r) for r in requests)))
    finally:
        await client.close()


def _executions(url: str) -> float:
    return metrics(url)["nv_inference_exec_count"]


def _close(got: dict[str, np.ndarray], *expected: dict[str, np.ndarray], what: str = "") -> None:
    for want in expected:
        for name, value in want.items():
            assert got[name].shape == value.shape, (what, name)
            np.testing.assert_allclose(
                got[name], value, rtol=0, atol=ATOL, err_msg=f"{what} {name}"
            )


def _tagger_requests(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    """Requests of different batch sizes and lengths; every other one with ragged lengths."""
    requests = []
    for i in range(n):
        batch, steps = int(rng.integers(1, 4)), int(rng.integers(1, 21))
        request = {"tokens": rng.integers(1, VOCAB, (batch, steps))}
        if i % 2:
            request["lengths"] = rng.integers(1, steps + 1, batch)
        requests.append(request)
    return requests


def _detector_requests(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    """Requests of two sequence lengths, interleaved, batch 1 or 2."""
    return [
        {"features": rng.standard_normal((1 + i % 2, (4, 7)[i % 3 == 0], FEATURES), np.float32)}
        for i in range(n)
    ]


# -- metadata, config, the Triton repository --------------------------------------------------


def test_metadata_and_config_come_from_the_signature(
    tagger: Exported, detector: Exported, tagger_urls: tuple[str, str], detector_urls: tuple
) -> None:
    for exported, (http_url, grpc_url) in ((tagger, tagger_urls), (detector, detector_urls)):
        sig, info = exported.bundle.signature, exported.bundle.info
        optional = {info.lengths, *info.state_inputs} - {None}
        client = http.InferenceServerClient(http_url)
        try:
            metadata = client.get_model_metadata(MODEL)
            config = client.get_model_config(MODEL)
        finally:
            client.close()
        grpc_client = grpc.InferenceServerClient(grpc_url)
        try:
            over_grpc = grpc_client.get_model_metadata(MODEL, as_json=True)  # int64 as text
        finally:
            grpc_client.close()
        for side in ("inputs", "outputs"):
            assert [
                (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in over_grpc[side]
            ] == [(t["name"], t["datatype"], t["shape"]) for t in metadata[side]]
        for side in ("inputs", "outputs"):
            specs = getattr(sig, side)
            assert [t["name"] for t in metadata[side]] == [t.name for t in specs]
            for t, spec in zip(metadata[side], specs, strict=True):
                assert t["datatype"] == np_to_triton_dtype(np.dtype(spec.dtype))
                # A [batch] tensor as Triton presents it: dims [1], reshaped away.
                assert t["shape"] == (spec.wire_shape if len(spec.shape) > 1 else [-1, 1])
        assert {t["name"] for t in config["input"] if t.get("optional")} == optional
        parameter = config["parameters"]["model_info"]["string_value"]
        assert Layout.from_json(json.loads(parameter)) == layout_of(info)


def test_the_triton_repository_reads_the_model_info(tagger: Exported, detector: Exported) -> None:
    """Configs that Triton's own protobuf parses, the stateful model only where streamable, and
    the ModelInfo that model.py reads equal to the manifest's."""
    for exported, stateful in ((tagger, False), (detector, True)):
        bundle = exported.bundle
        names = {"lstm_onnx", "lstm_python"} | ({"lstm_python_stateful"} if stateful else set())
        assert set(bundle.manifest["triton"]) == names
        for name in names:
            config = text_format.Parse(
                (bundle.path / "triton" / name / "config.pbtxt").read_text(),
                model_config_pb2.ModelConfig(),
            )
            assert [t.name for t in config.input] == bundle.signature.input_names
            if name.startswith("lstm_python"):
                info = json.loads(config.parameters["model_info"].string_value)
                assert Layout.from_json(info) == layout_of(bundle.info)
                ragged = {t.name for t in config.input if t.allow_ragged_batch}
                assert ragged == ({"tokens"} if exported is tagger else set())


# -- batching ---------------------------------------------------------------------------------


def test_requests_of_different_lengths_merge_and_equal_their_lone_runs(
    tagger: Exported, tagger_urls: tuple[str, str]
) -> None:
    requests = _tagger_requests(np.random.default_rng(1), 24)
    url = tagger_urls[0]
    before = _executions(url)
    results = asyncio.run(_infer_all(url, requests, ["logits"]))
    executions = _executions(url) - before
    for i, (request, got) in enumerate(zip(requests, results, strict=True)):
        _close(got, tagger.alone(request, ["logits"]), tagger.eager(request), what=f"#{i}")
    assert 1 <= executions < len(requests) / 2, executions


def test_integer_inputs_pad_with_the_low_end_of_their_range() -> None:
    """Padding that the model sees (positions past each length): token ids it takes."""
    sig = Signature(
        (
            TensorSpec("tokens", "int64", ("batch", "sequence")),
            TensorSpec("lengths", "int64", ("batch",)),
        ),
        (TensorSpec("logits", "float32", ("batch", "sequence", TAGS)),),
    )
    layout = layout_of(ModelInfo(sig, lengths="lengths", ranges={"tokens": (3, 9)}))
    short = {"tokens": np.full((1, 2), 5), "lengths": np.array([2])}
    long = {"tokens": np.full((2, 4), 6), "lengths": np.array([4, 1])}
    merged, plan = layout.merge([short, long])
    np.testing.assert_array_equal(merged["tokens"][0], [5, 5, 3, 3])
    np.testing.assert_array_equal(merged["lengths"], [2, 4, 1])
    logits = np.arange(3 * 4 * TAGS, dtype=np.float32).reshape(3, 4, TAGS)
    parts = layout.split({"logits": logits}, plan)
    assert [p["logits"].shape for p in parts] == [(1, 2, TAGS), (2, 4, TAGS)]
    np.testing.assert_array_equal(parts[1]["logits"], logits[1:])


def test_without_lengths_only_equal_shapes_share_a_run(detector: Exported) -> None:
    """The batcher over the real model.onnx, every request queued at once: one run per shape,
    never a padded one (the LSTM's state after padding would differ from the request's own)."""
    layout = layout_of(detector.bundle.info)
    session = detector.session
    names = detector.bundle.signature.output_names
    runs: list[tuple[int, ...]] = []

    def predict(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runs.append(feeds["features"].shape)
        return dict(zip(names, session.run(names, feeds), strict=True))

    requests = _detector_requests(np.random.default_rng(2), 12)

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(predict, layout, max_batch_size=64, max_queue_delay_s=0.05)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(layout.fill_defaults(r)) for r in requests))
        await batcher.stop()
        return list(results)

    results = asyncio.run(main())
    rows = {
        t: sum(len(r["features"]) for r in requests if r["features"].shape[1] == t) for t in (4, 7)
    }
    assert sorted(runs) == sorted((rows[t], t, FEATURES) for t in (4, 7)), runs
    for request, got in zip(requests, results, strict=True):
        _close(got, detector.alone(request, names), detector.eager(request))


def test_the_server_merges_equal_shapes_only(
    detector: Exported, detector_urls: tuple[str, str]
) -> None:
    requests = _detector_requests(np.random.default_rng(3), 24)
    url = detector_urls[0]
    names = detector.bundle.signature.output_names
    before = _executions(url)
    results = asyncio.run(_infer_all(url, requests, names))
    executions = _executions(url) - before
    for i, (request, got) in enumerate(zip(requests, results, strict=True)):
        _close(got, detector.alone(request, names), detector.eager(request), what=f"#{i}")
    assert 2 <= executions < len(requests), executions


# -- errors -----------------------------------------------------------------------------------

TOKENS = np.array([[3, 4, 5, 6]])
FEATURES_1x4 = np.zeros((1, 4, FEATURES), np.float32)
H0 = np.zeros((1, 2, 16), np.float32)
ERRORS = [
    ("tagger", {"tokens": np.array([[3, 50, -3, 7]])}, {}, "input 'tokens' must hold values "
     "in [0, 50); got -3, 50"),
    ("tagger", {"tokens": TOKENS, "lengths": np.array([5])}, {}, "lengths must be in [1, 4]"),
    ("tagger", {"tokens": TOKENS.astype(np.float32)}, {}, "inference input 'tokens' data-type "
     "is 'FP32', but model 'lstm_onnx' expects 'INT64'"),
    ("tagger", {"lengths": np.array([4])}, {}, "expected input 'tokens' for model 'lstm_onnx'"),
    ("tagger", {"tokens": TOKENS}, {"sequence_id": 9, "sequence_start": True},
     "model 'lstm_onnx' cannot be streamed"),
    ("detector", {"features": np.full((1, 4, FEATURES), np.nan, np.float32)}, {},
     "input 'features' contains NaN or Inf"),
    ("detector", {"features": np.zeros((1, 4, 39), np.float32)}, {},
     "unexpected shape for input 'features' for model 'lstm_onnx'. Expected [-1,-1,40]"),
    ("detector", {"features": FEATURES_1x4, "lstm.h0": np.zeros((2, 2, 16), np.float32)}, {},
     "input 'lstm.h0' has batch size 2, but 'features' has 1"),
    ("detector", {"features": FEATURES_1x4, "lstm.h0": H0},
     {"sequence_id": 9, "sequence_start": True},
     "lstm.h0 and lstm.c0 may be given only together, and only with sequence_start"),
]  # fmt: skip


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(("model", "inputs", "params", "words"), ERRORS)
def test_errors_name_the_tensor_and_the_rule(
    request: pytest.FixtureRequest,
    protocol: str,
    model: str,
    inputs: dict[str, np.ndarray],
    params: dict[str, Any],
    words: str,
) -> None:
    http_url, grpc_url = request.getfixturevalue(f"{model}_urls")
    client = _client(grpc_url if protocol == "grpc" else http_url, protocol)
    try:
        with pytest.raises(InferenceServerException) as e:
            infer(client, MODEL, inputs, outputs=["logits" if model == "tagger" else "prob"],
                  **params)  # fmt: skip
    finally:
        client.close()
    status = "StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400"
    assert e.value.status() == status and words in e.value.message(), e.value


# -- streaming --------------------------------------------------------------------------------


def test_streamed_chunks_equal_one_whole_run(
    detector: Exported, detector_urls: tuple[str, str]
) -> None:
    """Two sequences at once, one over HTTP and one over gRPC, their chunks interleaved: each
    equals the whole sequence in one request and the eager module, its final state too."""
    x = np.random.default_rng(4).standard_normal((2, 12, FEATURES), np.float32)
    bounds = [(0, 3), (3, 4), (4, 10), (10, 12)]
    names = detector.bundle.signature.output_names
    clients = {p: _client(url, p) for p, url in zip(("http", "grpc"), detector_urls, strict=True)}
    try:
        ids = {"http": 21, "grpc": "chunked"}
        rows = {"http": 0, "grpc": 1}
        parts: dict[str, list[dict[str, np.ndarray]]] = {"http": [], "grpc": []}
        for k, (a, b) in enumerate(bounds):
            for protocol, client in clients.items():
                chunk = {"features": x[rows[protocol] : rows[protocol] + 1, a:b]}
                parts[protocol].append(
                    infer(client, MODEL, chunk, outputs=names, sequence_id=ids[protocol],
                          sequence_start=k == 0, sequence_end=k == len(bounds) - 1)
                )  # fmt: skip
        whole = infer(clients["http"], MODEL, {"features": x}, outputs=names)
    finally:
        for client in clients.values():
            client.close()
    eager = detector.eager({"features": x})
    for protocol, row in rows.items():
        streamed = {
            "prob": np.concatenate([p["prob"] for p in parts[protocol]], axis=1),
            **{n: parts[protocol][-1][n] for n in STATE},
        }
        one = {n: v[row : row + 1] for n, v in whole.items() if n in streamed}
        _close(streamed, one, {n: v[row : row + 1] for n, v in eager.items()}, what=protocol)


# -- the same bundles on a real Triton (the python-backend models) -----------------------------


def test_the_triton_python_models_serve_whole_models(tagger: Exported, detector: Exported) -> None:
    python = triton_python()
    with TritonServer(check_repository(tagger.bundle, ["lstm_python"]), ["lstm_python"],
                      python=python) as server:  # fmt: skip
        requests = _tagger_requests(np.random.default_rng(5), 12)
        results = asyncio.run(_infer_all(server.http_url, requests, ["logits"], "lstm_python"))
        for request, got in zip(requests, results, strict=True):
            _close(got, tagger.alone(request, ["logits"]), tagger.eager(request))
        client = http.InferenceServerClient(server.http_url)
        try:
            with pytest.raises(InferenceServerException, match=r"'tokens' must hold .* \[0, 50\)"):
                infer(client, "lstm_python", {"tokens": TOKENS + 47}, outputs=["logits"])
        finally:
            client.close()
    with TritonServer(check_repository(detector.bundle), python=python) as server:
        names = detector.bundle.signature.output_names
        requests = _detector_requests(np.random.default_rng(6), 12)
        results = asyncio.run(_infer_all(server.http_url, requests, names, "lstm_python"))
        for request, got in zip(requests, results, strict=True):
            _close(got, detector.alone(request, names), detector.eager(request))
        x = np.random.default_rng(7).standard_normal((1, 9, FEATURES), np.float32)
        client = grpc.InferenceServerClient(server.grpc_url)
        try:
            parts = [
                infer(client, "lstm_python_stateful", {"features": x[:, a:b]}, outputs=names,
                      sequence_id=5, sequence_start=a == 0, sequence_end=b == 9)
                for a, b in ((0, 2), (2, 7), (7, 9))
            ]  # fmt: skip
        finally:
            client.close()
        streamed = {
            "prob": np.concatenate([p["prob"] for p in parts], axis=1),
            **{n: parts[-1][n] for n in STATE},
        }
        _close(streamed, detector.eager({"features": x}))


def test_loadtest_refuses_a_whole_model(
    tagger_urls: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """loadtest sends an LSTM's random features: a tagger's token ids are not that."""
    from lstm_deploy_serving import cli

    args = ["--concurrency", "1", "--requests", "2", "--warmup", "0"]
    assert cli.main(["loadtest", f"http://{tagger_urls[0]}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loadtest drives LSTM models" in err, err
    assert "model 'lstm_onnx' takes tokens, lengths" in err
