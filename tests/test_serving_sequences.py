"""Stateful streams: the SequenceStore on its own, and chunked streaming through the server.

Feeding a sequence in chunks must give what one request with the whole sequence gives (<= 1e-5).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as http
from lstm_deploy_serving.errors import BadRequest, ServerFault, Unavailable
from lstm_deploy_serving.sequences import SequenceStore
from serving_support import Reference, metrics, running_server, wait_until
from tritonclient.utils import InferenceServerException

ATOL = 1e-5
MODEL = "lstm_onnx"


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _zeros() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 4), np.float32)


def _store(**kw: float) -> tuple[SequenceStore, _Clock]:
    clock = _Clock()
    return SequenceStore(_zeros, clock=clock, **kw), clock  # type: ignore[arg-type]


def _ones() -> tuple[np.ndarray, np.ndarray]:
    return np.ones((1, 2, 4), np.float32), np.ones((1, 2, 4), np.float32)


def test_state_is_kept_between_chunks_and_freed_at_end() -> None:
    store, _ = _store()
    h, _c = store.acquire("a", start=True)
    assert not h.any()
    store.release("a", _ones())
    h, _c = store.acquire("a", start=False)
    assert h.all()
    store.release("a", _ones(), end=True)
    assert "a" not in store and len(store) == 0
    with pytest.raises(BadRequest, match="not live"):
        store.acquire("a", start=False)


def test_initial_state_only_at_start() -> None:
    store, _ = _store()
    h, _ = store.acquire(1, start=True, initial=_ones())
    assert h.all()
    store.release(1, _zeros())
    with pytest.raises(BadRequest, match="only be given with sequence_start"):
        store.acquire(1, start=False, initial=_ones())


def test_idle_timeout_evicts() -> None:
    store, clock = _store(idle_timeout_s=10.0)
    for key in ("old", "new"):
        store.acquire(key, start=True)
        store.release(key, _zeros())
        clock.now += 6
    assert store.evict_idle() == ["old"]  # idle 12 s; "new" idle 6 s
    assert store.evicted_idle == 1 and "new" in store


def test_cap_evicts_the_oldest_idle_and_never_a_busy_one() -> None:
    store, clock = _store(max_sequences=2)
    store.acquire("busy", start=True)  # in flight: must survive
    clock.now += 1
    store.acquire("idle", start=True)
    store.release("idle", _zeros())
    clock.now += 1
    store.acquire("third", start=True)  # at the cap: evicts "idle", not the older "busy"
    assert "busy" in store and "idle" not in store and store.evicted_cap == 1
    with pytest.raises(Unavailable, match="busy"):
        store.acquire("fourth", start=True)  # every live sequence is busy


def test_touching_a_sequence_makes_it_the_newest() -> None:
    store, clock = _store(max_sequences=2)
    for key in ("a", "b"):
        store.acquire(key, start=True)
        store.release(key, _zeros())
        clock.now += 1
    store.acquire("a", start=False)
    store.release("a", _zeros())
    store.acquire("c", start=True)
    assert "a" in store and "b" not in store


def test_cancel_keeps_the_state_before_the_failed_chunk() -> None:
    store, _ = _store()
    store.acquire("s", start=True)
    store.release("s", _ones())
    store.acquire("s", start=False)
    store.cancel("s")
    assert store.acquire("s", start=False)[0].all()
    store.cancel("s")
    store.acquire("fresh", start=True)
    store.cancel("fresh")  # a start that failed leaves nothing behind
    assert "fresh" not in store
    store.acquire("s", start=False)
    with pytest.raises(BadRequest, match="in flight"):
        store.acquire("s", start=False)
    with pytest.raises(ServerFault):
        store.release("nope", _zeros())


# -- through the server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(onnx_bundle: Path) -> Iterator[str]:
    with running_server(onnx_bundle) as address:
        yield address


def _infer(client: http.InferenceServerClient, x: np.ndarray, **kw: object) -> http.InferResult:
    item = http.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
    return client.infer(MODEL, [item], **kw)


def _stream(
    client: http.InferenceServerClient, x: np.ndarray, chunks: int, seq_id: object
) -> dict[str, np.ndarray]:
    pieces = np.array_split(x, chunks, axis=1)
    outputs, result = [], None
    for i, piece in enumerate(pieces):
        result = _infer(
            client,
            piece,
            sequence_id=seq_id,
            sequence_start=i == 0,
            sequence_end=i == len(pieces) - 1,
        )
        outputs.append(result.as_numpy("output"))
    assert result is not None
    return {
        "output": np.concatenate(outputs, axis=1),
        "hn": result.as_numpy("hn"),
        "cn": result.as_numpy("cn"),
    }


@pytest.mark.parametrize("chunks", [1, 3, 10])
def test_streaming_in_chunks_equals_one_shot(url: str, reference: Reference, chunks: int) -> None:
    x = reference.random_input(np.random.default_rng(chunks), 1, 50)
    client = http.InferenceServerClient(url)
    try:
        got = _stream(client, x, chunks, seq_id=100 + chunks)
        with pytest.raises(InferenceServerException, match="not live") as e:
            _infer(client, x[:, :1], sequence_id=100 + chunks)  # freed at sequence_end
        assert e.value.status() == "400"
    finally:
        client.close()
    whole = reference.run(x)
    for name in ("output", "hn", "cn"):
        np.testing.assert_allclose(got[name], whole[name], rtol=0, atol=ATOL, err_msg=name)


def test_interleaved_streams_and_string_ids(url: str, reference: Reference) -> None:
    """Two streams advancing in turn keep separate states; string ids work as in Triton."""
    rng = np.random.default_rng(7)
    xa, xb = reference.random_input(rng, 1, 12), reference.random_input(rng, 1, 12)
    client = http.InferenceServerClient(url)
    try:
        for i in range(4):
            for key, x in (("stream-a", xa), (42, xb)):
                result = _infer(
                    client,
                    x[:, 3 * i : 3 * i + 3],
                    sequence_id=key,
                    sequence_start=i == 0,
                    sequence_end=i == 3,
                )
                if i == 3:
                    np.testing.assert_allclose(
                        result.as_numpy("hn"), reference.run(x)["hn"], rtol=0, atol=ATOL
                    )
    finally:
        client.close()


def test_initial_state_at_sequence_start(url: str, reference: Reference) -> None:
    rng = np.random.default_rng(10)
    x = reference.random_input(rng, 1, 8)
    h0 = rng.standard_normal((1, *reference.h_shape), dtype=np.float32)
    c0 = rng.standard_normal((1, *reference.c_shape), dtype=np.float32)
    client = http.InferenceServerClient(url)
    try:
        items = [http.InferInput("input", [1, 4, x.shape[2]], "FP32").set_data_from_numpy(x[:, :4])]
        for name, value in (("h0", h0), ("c0", c0)):
            items.append(
                http.InferInput(name, list(value.shape), "FP32").set_data_from_numpy(value)
            )
        client.infer(MODEL, items, sequence_id="init", sequence_start=True)
        with pytest.raises(InferenceServerException, match="only with sequence_start"):
            client.infer(MODEL, [items[0], items[1]], sequence_id="init")
        last = _infer(client, x[:, 4:], sequence_id="init", sequence_end=True)
    finally:
        client.close()
    whole = reference.run(x, h0=h0, c0=c0)
    np.testing.assert_allclose(last.as_numpy("cn"), whole["cn"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(last.as_numpy("output"), whole["output"][:, 4:], rtol=0, atol=ATOL)


def test_sequence_rules(url: str, reference: Reference) -> None:
    x = reference.random_input(np.random.default_rng(8), 2, 3)
    client = http.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException, match="batch size 1") as e:
            _infer(client, x, sequence_id=5, sequence_start=True)
        assert e.value.status() == "400"
        with pytest.raises(InferenceServerException, match="not live"):
            _infer(client, x[:1], sequence_id=999)
        assert _infer(client, x[:1]).as_numpy("hn") is not None  # still serving
    finally:
        client.close()


def test_idle_timeout_and_cap_through_the_server(onnx_bundle: Path, reference: Reference) -> None:
    x = reference.random_input(np.random.default_rng(9), 1, 2)
    with running_server(onnx_bundle, sequence_idle_timeout_s=0.3, max_sequences=2) as address:
        client = http.InferenceServerClient(address)
        try:
            for key in (1, 2):
                _infer(client, x, sequence_id=key, sequence_start=True)
            _infer(client, x, sequence_id=1)  # touch 1: 2 is now the idle-longest
            _infer(client, x, sequence_id=3, sequence_start=True)  # cap: evicts 2
            with pytest.raises(InferenceServerException, match="not live"):
                _infer(client, x, sequence_id=2)
            _infer(client, x, sequence_id=1)
            assert metrics(address)["lstm_deploy_sequences_live"] == 2
            # idle timeout: the server's sweeper frees both without any request
            assert wait_until(lambda: metrics(address)["lstm_deploy_sequences_live"] == 0, 5)
            time.sleep(0.01)
            with pytest.raises(InferenceServerException, match="not live"):
                _infer(client, x, sequence_id=3)
            assert metrics(address)["lstm_deploy_sequences_evicted"] >= 3
        finally:
            client.close()


def test_a_bidirectional_model_cannot_be_streamed(tmp_path: Path) -> None:
    """Its backward direction starts at the sequence's last step: a stream has not sent it yet.
    The server says so with 400 and serves the whole sequence; the bundle has no stateful
    Triton model to stream it either."""
    import torch
    from lstm_deploy_export.export.writer import export_bundle

    from lstm_deploy import LSTM

    torch.manual_seed(0)
    model = LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    bundle = export_bundle(model, tmp_path / "bidirectional", artifacts="onnx")
    assert "lstm_python_stateful" not in bundle.manifest["triton"]
    assert not (bundle.path / "triton" / "lstm_python_stateful").exists()
    assert "lstm_python" in bundle.manifest["triton"]
    x = np.random.default_rng(0).standard_normal((1, 6, 3), dtype=np.float32)
    with running_server(bundle.path) as address:
        client = http.InferenceServerClient(address)
        try:
            with pytest.raises(InferenceServerException, match="bidirectional") as e:
                _infer(client, x, sequence_id=7, sequence_start=True)
            assert e.value.status() == "400" and "without sequence_id" in str(e.value)
            whole = _infer(client, x).as_numpy("output")
            with torch.no_grad():
                expected = model(torch.from_numpy(x))[0].numpy()
            np.testing.assert_allclose(whole, expected, rtol=0, atol=ATOL)
        finally:
            client.close()
