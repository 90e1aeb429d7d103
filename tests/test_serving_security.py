"""Connection hygiene and opt-in security, against real servers on loopback.

Slow and oversized headers, keep-alive and concurrency limits, no ``server`` header; the API key
(401 without it, health open, never in the logs or in a usage error); TLS with a certificate made
here, checked by tritonclient against a direct ONNX Runtime run.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http
from lstm_deploy_serving.cli import main
from lstm_deploy_serving.launch import ServerProcess
from serving_support import Reference, running_server
from tritonclient.utils import InferenceServerException

HEADER_TIMEOUT_S = 1.0
SLOW_CLIENTS = 200
KEY = "s3cret-Key_for.tests~42"
MODEL = "/v2/models/lstm_onnx"


def _split(url: str) -> tuple[str, int]:
    host, port = url.split(":")
    return host, int(port)


def _get(url: str, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(*_split(url), timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def _closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closes ``sock`` (reading and discarding), None if it did not."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return time.monotonic() - start


def _status_line(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    try:
        return sock.recv(65536).split(b"\r\n", 1)[0]
    except ConnectionResetError:
        return b""


@pytest.fixture(scope="module")
def guarded(onnx_bundle: Path) -> ServerProcess:
    args = ["--header-timeout", str(HEADER_TIMEOUT_S), "--keep-alive-timeout", "2"]
    with ServerProcess(onnx_bundle, args) as server:
        yield server


def test_slow_and_silent_clients_are_closed_after_the_header_timeout(
    guarded: ServerProcess,
) -> None:
    address = _split(guarded.url)
    silent = [socket.create_connection(address, 5) for _ in range(SLOW_CLIENTS // 2)]
    trickling = [socket.create_connection(address, 5) for _ in range(SLOW_CLIENTS // 2)]
    opened = time.monotonic()
    head = f"POST {MODEL}/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode()
    served_meanwhile = False
    # One byte every 0.1 s on each trickling connection: bytes do not extend the timeout.
    for i in range(int(HEADER_TIMEOUT_S * 25)):
        for sock in trickling:
            with contextlib.suppress(OSError):  # closed already
                sock.send(head[i : i + 1] or b"a")
        if i == 3:
            served_meanwhile = _get(guarded.url, "/v2/health/ready").status == 200
        time.sleep(0.1)
    closed = [_closed_within(s, 0.5) for s in silent + trickling]
    elapsed = time.monotonic() - opened
    for sock in silent + trickling:
        sock.close()
    print(f"\nslowloris: {closed.count(None)} of {len(closed)} open after {elapsed:.1f} s")
    assert served_meanwhile
    assert None not in closed, f"{closed.count(None)} of {len(closed)} still open"
    assert _get(guarded.url, "/v2/health/ready").status == 200


@pytest.mark.parametrize("trickled", [False, True], ids=["one-write", "trickled"])
def test_a_huge_header_gets_431(guarded: ServerProcess, trickled: bool) -> None:
    request = f"GET {MODEL} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 100_000}\r\n\r\n".encode()
    with socket.create_connection(_split(guarded.url), 5) as sock:
        try:
            if trickled:
                for i in range(0, len(request), 4096):
                    sock.sendall(request[i : i + 4096])
                    time.sleep(0.001)
            else:
                sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before all of it was sent: refused too
        status = _status_line(sock)
    assert status in (b"HTTP/1.1 431 Request Header Fields Too Large", b""), status


def test_no_server_header_and_idle_keep_alive_closes(guarded: ServerProcess) -> None:
    conn = http.client.HTTPConnection(*_split(guarded.url), timeout=10)
    conn.request("GET", "/v2/health/ready")
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    assert response.getheader("server") is None
    assert conn.sock is not None
    closed_after = _closed_within(conn.sock, 5)
    conn.close()
    assert closed_after is not None and 1.5 < closed_after < 3.5, closed_after


def test_limit_concurrency_answers_503_beyond_it(onnx_bundle: Path) -> None:
    with running_server(onnx_bundle, limit_concurrency=2) as url:
        held = [http.client.HTTPConnection(*_split(url), timeout=10) for _ in range(3)]
        statuses = []
        for conn in held:  # each stays open (kept alive) after its request
            conn.request("GET", "/v2/health/live")
            response = conn.getresponse()
            body = response.read()
            statuses.append(response.status)
        for conn in held:
            conn.close()
    assert statuses == [200, 200, 503]
    assert "concurrency limit" in json.loads(body)["error"]


def test_api_key_guards_every_route_but_health(onnx_bundle: Path, reference: Reference) -> None:
    args = ["--log-level", "debug", "--access-log"]
    with ServerProcess(onnx_bundle, args, env={"LSTM_DEPLOY_API_KEY": KEY}) as server:
        url = server.url
        good = {"Authorization": f"Bearer {KEY}"}
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert _get(url, path).status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            for path in (MODEL, "/v2", "/metrics", MODEL + "/config", "/v2/models/nope"):
                response = _get(url, path, headers)
                assert response.status == 401, (path, headers)
                assert response.getheader("www-authenticate", "").startswith("Bearer")
        assert _get(url, MODEL, good).status == 200
        assert _get(url, "/metrics", {"Authorization": f"bearer {KEY}"}).status == 200

        x = reference.random_input(np.random.default_rng(1), 2, 5)
        item = triton_http.InferInput("input", list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        client = triton_http.InferenceServerClient(url)
        try:
            with pytest.raises(InferenceServerException, match="API key"):
                client.infer("lstm_onnx", [item])
            result = client.infer("lstm_onnx", [item], headers=good)
        finally:
            client.close()
        np.testing.assert_allclose(result.as_numpy("hn"), reference.run(x)["hn"], atol=1e-6)
    logs = "\n".join(server.lines)
    assert "401" in logs  # the access log is there, and it does not hold the key
    assert KEY not in logs


def test_api_key_errors_and_help_never_show_the_key(
    tmp_path: Path, onnx_bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("LSTM_DEPLOY_API_KEY", KEY)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    both = ["--api-key", KEY, "--api-key-file", str(key_file)]
    assert main(["serve", str(onnx_bundle), *both]) == 2
    assert main(["serve", str(onnx_bundle), "--api-key", KEY + " space"]) == 2
    assert main(["serve", str(onnx_bundle), "--ssl-keyfile", str(key_file)]) == 2
    out = capsys.readouterr()
    assert KEY not in out.out + out.err
    assert "not both" in out.err and "printable ASCII" in out.err


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_tls_serves_https_that_tritonclient_verifies(
    tmp_path: Path, onnx_bundle: Path, reference: Reference
) -> None:
    cert, key = _self_signed(tmp_path)
    args = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    with ServerProcess(onnx_bundle, args) as server:
        assert server.scheme == "https"
        x = reference.random_input(np.random.default_rng(2), 3, 7)
        item = triton_http.InferInput("input", list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        client = triton_http.InferenceServerClient(
            server.url,
            ssl=True,
            ssl_context_factory=lambda: ssl.create_default_context(cafile=str(cert)),
        )
        try:
            result = client.infer("lstm_onnx", [item])
        finally:
            client.close()
        # Plain HTTP on the TLS port is not served.
        with pytest.raises((http.client.HTTPException, OSError)):
            _get(server.url, "/v2/health/ready")
    expected = reference.run(x)
    for name in ("output", "hn", "cn"):
        np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=0, atol=1e-6)


def test_a_bad_certificate_is_a_usage_error(
    tmp_path: Path, onnx_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n")
    assert main(["serve", str(onnx_bundle), "--port", "0", "--ssl-certfile", str(bad)]) == 2
    assert "TLS certificate" in capsys.readouterr().err
