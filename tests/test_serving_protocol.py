"""Protocol and codecs: bodies in, typed requests out, typed responses back to bodies.

tritonclient's own request encoder and response decoder are the reference for the wire format.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as http
from lstm_deploy_serving import codecs
from lstm_deploy_serving.errors import BadRequest
from lstm_deploy_serving.protocol import (
    HEADER_LENGTH,
    InferResponse,
    OutputTensor,
    encode_infer_response,
    parse_infer_request,
)

Client = http.InferenceServerClient


@pytest.mark.parametrize(
    ("datatype", "dtype"),
    [
        ("FP32", np.float32),
        ("FP64", np.float64),
        ("FP16", np.float16),
        ("INT64", np.int64),
        ("INT32", np.int32),
        ("UINT8", np.uint8),
        ("BOOL", np.bool_),
    ],
)
def test_datatype_table_round_trips(datatype: str, dtype: type) -> None:
    assert codecs.dtype_of(datatype) == np.dtype(dtype)
    assert codecs.datatype_of(np.dtype(dtype)) == datatype
    value = np.arange(6).reshape(2, 3).astype(dtype)
    raw = codecs.encode_bytes(value)
    np.testing.assert_array_equal(codecs.decode_bytes("x", datatype, (2, 3), raw), value)
    np.testing.assert_array_equal(
        codecs.decode_json("x", datatype, (2, 3), codecs.encode_json(value)), value
    )


def test_unknown_datatype() -> None:
    with pytest.raises(BadRequest, match="unsupported datatype 'BYTES'"):
        codecs.dtype_of("BYTES")


def test_json_data_flat_or_nested() -> None:
    nested = [[[1, 2], [3, 4]], [[5, 6], [7, 8.5]]]
    flat = [1, 2, 3, 4, 5, 6, 7, 8.5]
    a = codecs.decode_json("x", "FP32", (2, 2, 2), nested)
    b = codecs.decode_json("x", "FP32", (2, 2, 2), flat)
    assert a.dtype == np.float32 and a.shape == (2, 2, 2)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("datatype", "data", "match"),
    [
        ("FP32", [1, 2, 3], "3 values in data, but shape \\[2, 2\\] needs 4"),
        ("FP32", [[1, 2], [3]], "not a regular"),
        ("FP32", ["1", "2", "3", "4"], "holds 'U' values, not FP32"),
        ("INT64", [1.5, 2, 3, 4], "holds 'f' values, not INT64"),
    ],
)
def test_json_data_errors(datatype: str, data: list, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(BadRequest, match=match):
        codecs.decode_json("x", datatype, (2, 2), data)


def test_binary_size_must_match_shape() -> None:
    with pytest.raises(
        BadRequest, match="binary_data_size is 12 bytes, but FP32 \\[2, 2\\] needs 16"
    ):
        codecs.decode_bytes("x", "FP32", (2, 2), b"\0" * 12)


def _body(inputs: list[http.InferInput], **kw: object) -> tuple[bytes, int | None]:
    body, header_length = Client.generate_request_body(inputs, **kw)
    return body, header_length


def test_parse_what_tritonclient_sends() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4), dtype=np.float32)
    lengths = np.array([3, 1], np.int64)
    a = http.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
    b = http.InferInput("lengths", [2], "INT64").set_data_from_numpy(lengths, binary_data=False)
    outputs = [http.InferRequestedOutput("hn"), http.InferRequestedOutput("cn", binary_data=False)]
    body, header_length = _body(
        [a, b], outputs=outputs, request_id="7", sequence_id=5, sequence_start=True, timeout=100
    )
    request = parse_infer_request(body, header_length)
    assert [t.name for t in request.inputs] == ["input", "lengths"]
    np.testing.assert_array_equal(request.inputs[0].data, x)
    np.testing.assert_array_equal(request.inputs[1].data, lengths)
    assert request.id == "7"
    assert request.outputs is not None
    assert [(o.name, o.binary) for o in request.outputs] == [("hn", True), ("cn", False)]
    assert request.parameters["sequence_id"] == 5 and request.parameters["timeout"] == 100


def test_no_outputs_named_means_all_binary() -> None:
    x = np.zeros((1, 1, 4), np.float32)
    body, header_length = _body(
        [http.InferInput("input", [1, 1, 4], "FP32").set_data_from_numpy(x)]
    )
    request = parse_infer_request(body, header_length)
    assert request.outputs is None and request.binary_output


def _binary_request(extra: bytes = b"", size: int = 16) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 1, 4],
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    ).encode()
    return header + b"\0" * 16 + extra, len(header)


@pytest.mark.parametrize(
    ("body", "header_length", "match"),
    [
        (b"{not json", None, "malformed JSON"),
        (b"[1, 2]", None, "the request must be a JSON object"),
        (b"{}", None, "non-empty list 'inputs'"),
        (*_binary_request(size=32), "truncated binary data"),
        (*_binary_request(extra=b"\0" * 4), "4 bytes of binary data after the inputs"),
        (_binary_request()[0], 10_000, "Inference-Header-Content-Length is 10000"),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1]}]}', None, "no 'data'"),
        (
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1], "data": []}]}',
            None,
            "shape must be a list of non-negative integers",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]},'
            b' {"name": "a", "datatype": "FP32", "shape": [1], "data": [2]}]}',
            None,
            "duplicate inputs: a",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1],'
            b' "parameters": {"shared_memory_region": "r"}}]}',
            None,
            "shared memory",
        ),
    ],
)
def test_parse_errors(body: bytes, header_length: int | None, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        parse_infer_request(body, header_length)


@pytest.mark.parametrize("binary", [True, False])
def test_response_is_what_tritonclient_reads(binary: bool) -> None:
    rng = np.random.default_rng(1)
    out = rng.standard_normal((2, 3, 5), dtype=np.float32)
    hn = rng.standard_normal((2, 1, 5), dtype=np.float32)
    response = InferResponse(
        "m", "1", (OutputTensor("output", out, binary), OutputTensor("hn", hn, False)), id="x"
    )
    body, headers = encode_infer_response(response)
    header_length = int(headers[HEADER_LENGTH]) if HEADER_LENGTH in headers else None
    assert (header_length is not None) == binary
    result = Client.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("output"), out)
    np.testing.assert_array_equal(result.as_numpy("hn"), hn)
    assert result.get_response()["id"] == "x"
    assert result.get_response()["model_name"] == "m"


def test_all_binary_response_without_id() -> None:
    """The header of an all-binary response without an id is reused for equal shapes (cached);
    tritonclient reads each response's own values, and the header equals the one written out."""
    rng = np.random.default_rng(2)
    for _ in range(2):
        out = rng.standard_normal((1, 4, 5), dtype=np.float32)
        lengths = rng.integers(0, 9, (1,), dtype=np.int64)
        outputs = (OutputTensor("output", out, True), OutputTensor("n", lengths, True))
        body, headers = encode_infer_response(InferResponse("m", "1", outputs))
        header_length = int(headers[HEADER_LENGTH])
        result = Client.parse_response_body(body, header_length=header_length)
        np.testing.assert_array_equal(result.as_numpy("output"), out)
        np.testing.assert_array_equal(result.as_numpy("n"), lengths)
        head = json.loads(body[:header_length])
        assert head == {
            "model_name": "m",
            "model_version": "1",
            "outputs": [
                {
                    "name": "output",
                    "datatype": "FP32",
                    "shape": [1, 4, 5],
                    "parameters": {"binary_data_size": out.nbytes},
                },
                {
                    "name": "n",
                    "datatype": "INT64",
                    "shape": [1],
                    "parameters": {"binary_data_size": 8},
                },
            ],
        }


# -- the header first: a request is judged on its shapes before its values are parsed ----------


@pytest.mark.parametrize(
    ("body", "skeleton"),
    [
        (b'{"data": [1, [2, 3]], "k": 1}', {"data": None, "k": 1}),
        (b'{"data" : [ 1e5 , -2 ] }', {"data": None}),
        (b'{"data": [true, false, null, NaN, -Infinity]}', {"data": None}),
        (b'{"data": []}', {"data": None}),
        (b'{"data": ["a", 1]}', {"data": ["a", 1]}),  # not numbers: left for the full parse
        (
            b'{"data": [[1], ["a"]], "x": {"data": [2]}}',
            {"data": [[1], ["a"]], "x": {"data": None}},
        ),
        (b'{"data": [{"data": [1]}]}', {"data": [{"data": None}]}),
        (b'{"id": "\\"data\\": [1]", "data": 5}', {"id": '"data": [1]', "data": 5}),
        (b'{"a\\"data": [1]}', {'a"data': None}),  # any key ending so: cut, still valid JSON
    ],
)
def test_the_header_without_its_data(body: bytes, skeleton: object) -> None:
    from lstm_deploy_serving.protocol import _without_data

    assert json.loads(_without_data(body)) == skeleton


def test_check_header_runs_before_the_data_is_parsed() -> None:
    """A body of 1,000,000 values is refused by the header check without parsing one of them."""
    from lstm_deploy_serving.protocol import RequestHeader

    values = b",".join([b"0"] * 1_000_000)
    head = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1000, 1000], "data": ['
    body = head + values + b", oops]}]}"  # not JSON: only a full parse would see that
    seen: list[RequestHeader] = []

    def refuse(header: RequestHeader) -> None:
        seen.append(header)
        raise BadRequest("refused")

    with pytest.raises(BadRequest, match="refused"):
        parse_infer_request(body, None, refuse)
    assert [(t.name, t.shape) for t in seen[0].inputs] == [("input", (1000, 1000))]
    # Without the check, the full parse is what refuses it.
    with pytest.raises(BadRequest, match="malformed JSON"):
        parse_infer_request(body)


def test_header_cache_parses_and_checks_a_header_once() -> None:
    """A repeated binary header is parsed and checked once and gives the same request; one with
    JSON data, or one the check refuses, is never kept; the oldest goes past ``size``."""
    from lstm_deploy_serving.protocol import HeaderCache, RequestHeader

    checked: list[RequestHeader] = []

    def check(header: RequestHeader) -> None:
        checked.append(header)
        if header.inputs[0].shape[1] == 9:
            raise BadRequest("nine steps refused")

    def binary(steps: int, seed: int) -> tuple[bytes, int, np.ndarray]:
        x = np.random.default_rng(seed).standard_normal((1, steps, 4), dtype=np.float32)
        item = http.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
        return (*_body([item], outputs=[http.InferRequestedOutput("hn")]), x)

    cache = HeaderCache(size=2)
    for seed in range(3):  # one header, three bodies: checked once, each body's own values
        body, length, x = binary(3, seed)
        request = parse_infer_request(body, length, check, cache=cache)
        np.testing.assert_array_equal(request.inputs[0].data, x)
        assert [(o.name, o.binary) for o in request.outputs or ()] == [("hn", True)]
    assert len(checked) == 1
    for _ in range(2):  # refused each time, never kept
        body, length, _ = binary(9, 0)
        with pytest.raises(BadRequest, match="nine steps"):
            parse_infer_request(body, length, check, cache=cache)
    assert len(checked) == 3
    as_json = http.InferInput("input", [1, 1, 4], "FP32")
    as_json.set_data_from_numpy(np.ones((1, 1, 4), np.float32), binary_data=False)
    body, length = _body([as_json])
    for _ in range(2):
        assert parse_infer_request(body, length, check, cache=cache).inputs[0].data.sum() == 4
    assert len(checked) == 5
    for steps in (4, 5, 3):  # size 2: 3 was the oldest when 5 came, so it is parsed again
        body, length, _ = binary(steps, 0)
        parse_infer_request(body, length, check, cache=cache)
    assert [h.inputs[0].shape[1] for h in checked[5:]] == [4, 5, 3]


def test_grpc_header_key_is_what_read_header_reads() -> None:
    """Equal for requests that differ only in their raw data; different where read_header's
    result or checks could differ (shape, parameters, how many raw entries); none for typed
    contents, whose values are in the inputs."""
    from lstm_deploy_serving.grpc_codec import header_key
    from tritonclient.grpc import service_pb2

    def request(shape: list[int], *raw: bytes, sequence_id: int = 0) -> object:
        message = service_pb2.ModelInferRequest(model_name="m")
        message.inputs.add(name="input", datatype="FP32", shape=shape)
        message.raw_input_contents.extend(raw)
        if sequence_id:
            message.parameters["sequence_id"].int64_param = sequence_id
        return message

    key = header_key(request([1, 4, 8], b"x" * 128))
    assert key is not None and key == header_key(request([1, 4, 8], b"y" * 128))
    others = [
        request([1, 4, 8], b"x" * 128, b"x" * 128),
        request([1, 5, 8], b"x" * 160),
        request([1, 4, 8], b"x" * 128, sequence_id=3),
    ]
    assert all(header_key(other) != key for other in others)
    typed = request([1, 1, 1])
    typed.inputs[0].contents.fp32_contents.append(1.0)
    assert header_key(typed) is None
