"""The drain on SIGTERM, against a real server process: keep-alive clients lose no request.

Every request either completes (200) or is refused before it is processed: 503 with
``Connection: close``, or a refused connection once the listening socket is closed. A reset or a
broken pipe after a request was written is a lost request: the client cannot tell whether it ran.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from lstm_deploy_serving.launch import ServerProcess
from serving_support import Reference

CLIENTS = 32
DRAIN_TIMEOUT_S = 10.0
INFER = "/v2/models/lstm_onnx/infer"


def _body(x: np.ndarray) -> str:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    return json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]})


class KeepAliveClient(threading.Thread):
    """Sends requests back to back on one kept-alive connection until the server refuses it."""

    def __init__(self, url: str, body: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        host, port = url.split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.body, self.stop = body, stop
        self.outcomes: Counter[str] = Counter()
        self.finished_at: list[float] = []  # monotonic time of each 200
        self.answers: list[dict] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.conn.request("POST", INFER, self.body, {"Content-Type": "application/json"})
            except ConnectionRefusedError:  # reconnecting after a close: nothing was sent
                self.outcomes["connection refused"] += 1
                return
            except OSError as e:
                self.outcomes[f"lost: {type(e).__name__}"] += 1
                return
            try:
                response = self.conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as e:
                self.outcomes[f"lost: {type(e).__name__}"] += 1
                return
            self.outcomes[str(response.status)] += 1
            if response.status == 200:
                self.finished_at.append(time.monotonic())
                if len(self.answers) < 2:
                    self.answers.append(json.loads(payload))
            else:
                assert response.getheader("connection") == "close", response.status
                assert "error" in json.loads(payload)
        self.conn.close()


def _probe_ready(url: str, stop: threading.Event, statuses: list[tuple[float, int]]) -> None:
    """Polls readiness on one kept-alive connection (a new one would be refused in the drain)."""
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    while not stop.is_set():
        try:
            conn.request("GET", "/v2/health/ready")
            response = conn.getresponse()
            response.read()
        except OSError:
            return
        statuses.append((time.monotonic(), response.status))
        if response.getheader("connection") == "close":
            return
        time.sleep(0.005)


def test_sigterm_under_keep_alive_load_loses_no_request(
    onnx_bundle: Path, reference: Reference
) -> None:
    x = reference.random_input(np.random.default_rng(0), 1, 8)
    expected = reference.run(x)["hn"]
    stop = threading.Event()
    # A 20 ms batching window keeps most clients' requests in the server when SIGTERM comes.
    args = ["--drain-timeout", str(DRAIN_TIMEOUT_S), "--max-queue-delay-us", "20000"]
    with ServerProcess(onnx_bundle, args) as server:
        clients = [KeepAliveClient(server.url, _body(x), stop) for _ in range(CLIENTS)]
        ready: list[tuple[float, int]] = []
        probe = threading.Thread(target=_probe_ready, args=(server.url, stop, ready), daemon=True)
        for c in [*clients, probe]:
            c.start()
        deadline = time.monotonic() + 30
        while min(c.outcomes["200"] for c in clients) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.process is not None
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(DRAIN_TIMEOUT_S + 5)
        exited = time.monotonic() - signalled
        for c in clients:
            c.join(10)
        stop.set()
        probe.join(10)

    totals = sum((c.outcomes for c in clients), Counter())
    lost = {k: n for k, n in totals.items() if k.startswith("lost")}
    after = sum(t > signalled for c in clients for t in c.finished_at)
    print(f"\ndrain: {dict(totals)}; 200s after SIGTERM: {after}; exit {code} in {exited:.2f} s")
    assert code == 0, "\n".join(server.lines)
    assert exited < DRAIN_TIMEOUT_S
    assert not lost, f"lost requests: {lost} of {sum(totals.values())}"
    assert all(c.outcomes["connection refused"] + c.outcomes["503"] >= 1 for c in clients)
    assert after >= 1, "no request in progress at SIGTERM finished"
    assert all(status == 200 for t, status in ready if t < signalled)
    assert any(status == 503 for t, status in ready if t > signalled), ready[-3:]
    for c in clients:
        for answer in c.answers:
            hn = next(o for o in answer["outputs"] if o["name"] == "hn")
            np.testing.assert_allclose(
                np.reshape(hn["data"], hn["shape"]), expected, rtol=0, atol=1e-6
            )


def test_drain_timeout_bounds_a_request_that_never_completes(onnx_bundle: Path) -> None:
    with ServerProcess(onnx_bundle, ["--drain-timeout", "1.5"]) as server:
        host, port = server.url.split(":")
        # Headers sent, the body never comes: the request is in progress until the drain ends.
        stuck = socket.create_connection((host, int(port)), 5)
        stuck.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode()
        )
        time.sleep(0.2)
        assert server.process is not None
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(10)
        exited = time.monotonic() - signalled
        stuck.settimeout(5)
        # Closed by the server at the deadline (or reset: the request was cancelled).
        with contextlib.suppress(ConnectionResetError):
            assert stuck.recv(1024) == b""
        stuck.close()
    assert code == 0, "\n".join(server.lines)
    assert 1.5 <= exited < 3.5, exited
