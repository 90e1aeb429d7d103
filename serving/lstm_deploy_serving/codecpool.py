"""Where request bodies are decoded and responses encoded: small ones inline, large ones in a
worker thread behind an admission limit.

A small body (the common case, up to ``inline_bytes``) is parsed and encoded on the event loop,
as a thread hop would cost more than the work. A larger one goes to a worker thread and to
``largejson``, whose steps are short (a few ms each), so the event loop gets the GIL back
between them and ``/v2/health/live`` keeps answering: a thread alone would not do it, as
``json.loads`` holds the GIL for its whole call. At most ``max_requests`` large bodies are
admitted at once (being decoded, or waiting for the worker); past that a new one is refused at
once with 503 and ``Retry-After`` rather than queued (a queue of 60 MB bodies only holds
memory). A large response waits for the worker instead: its request has already run.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from . import largejson
from .codecs import JSON_BYTES_PER_VALUE
from .errors import BadRequest, PayloadTooLarge, Unavailable
from .protocol import (
    HEADER_LENGTH,
    HeaderCache,
    InferRequest,
    InferResponse,
    RequestHeader,
    encode_infer_response,
    parse_infer_request,
)

INLINE_BYTES = 256 * 1024
# Content-Encoding -> zlib wbits (47 accepts both the zlib and the gzip container).
DECOMPRESS_WBITS = {"gzip": 47, "deflate": 47}

T = TypeVar("T")


@dataclass
class RawBody:
    """A request body as read: its chunks, not joined yet, and its Content-Encoding.

    ``limit``: the most bytes it may decompress to (413 past it).
    """

    chunks: list[bytes]
    size: int
    encoding: str = "identity"
    limit: int = 64 * 1024 * 1024

    def plain(self) -> bytes:
        """The body, joined (bytes.join gives up the GIL for large joins) and decompressed.

        It takes the chunks: they are freed as soon as the joined body exists.
        """
        body = b"".join(self.chunks)
        self.chunks = []
        return body if self.encoding == "identity" else inflate(body, self.encoding, self.limit)


class Busy(Unavailable):
    """Every worker is decoding or encoding a large body (503; the client may retry)."""

    retry_after_s = 1


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decompressed; 413 past ``limit`` bytes, whatever its compressed size."""
    if encoding not in DECOMPRESS_WBITS:
        raise BadRequest(f"unsupported Content-Encoding '{encoding}' (use gzip or deflate)")
    inflater = zlib.decompressobj(DECOMPRESS_WBITS[encoding])
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadRequest(f"the body is not valid {encoding} data: {e}") from None
    if len(plain) > limit:
        raise PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    if not inflater.eof:  # cut off before its end (and, for gzip, before its checksum)
        raise BadRequest(f"the body is not valid {encoding} data: the stream ends early")
    return plain


def _decode_large(
    body: RawBody,
    header_length: int | None,
    check_header: Callable[[RequestHeader], None] | None,
) -> InferRequest:
    return parse_infer_request(body.plain(), header_length, check_header, largejson.loads_header)


def _response_size(response: InferResponse) -> int:
    return sum(
        out.data.nbytes if out.binary else out.data.size * JSON_BYTES_PER_VALUE[out.data.dtype.kind]
        for out in response.outputs
    )


def encode_large_response(response: InferResponse) -> tuple[bytes, dict[str, str]]:
    """``encode_infer_response``'s body and headers, the JSON ``data`` written a chunk at a time.

    The protocol writes the header with a stand-in string per JSON output (a random nonce: no
    client-sent name or id can equal it), which is then replaced by the data's text.
    """
    nonce, arrays = secrets.token_hex(8), []

    def stand_in(array: np.ndarray) -> str:
        arrays.append(array)
        return f"\0{nonce}:{len(arrays) - 1}"

    body, headers = encode_infer_response(response, stand_in)
    if not arrays:
        return body, headers
    head_length = int(headers.get(HEADER_LENGTH, len(body)))
    head, rest = body[:head_length], body[head_length:]
    pieces = []
    for i, array in enumerate(arrays):
        token = json.dumps(f"\0{nonce}:{i}").encode()
        before, head = head.split(token, 1)
        pieces += [before, largejson.encode_json_data(array)]
    pieces.append(head)
    head = b"".join(pieces)
    if HEADER_LENGTH in headers:
        headers = {**headers, HEADER_LENGTH: str(len(head))}
    return head + rest if rest else head, headers


class CodecPool:
    """Decode and encode inference bodies, large ones in a worker thread.

    Args:
        max_requests: most large bodies admitted for decoding at once.
        inline_bytes: bodies and responses up to this size are handled on the event loop.
    """

    def __init__(self, max_requests: int, inline_bytes: int = INLINE_BYTES) -> None:
        self.max_requests = max(1, max_requests)
        self.inline_bytes = inline_bytes
        self._slots = asyncio.Semaphore(self.max_requests)
        # One thread: the work holds the GIL in short steps, so more threads add no throughput,
        # only contenders the event loop must wait behind (4 threads: liveness p99 140 ms under
        # four 65 MB bodies; 1 thread: 17 ms).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lstm-codec")
        # of the one check_header its server passes: (parsed JSON, header) by the JSON text
        self._headers: HeaderCache[tuple[Any, RequestHeader]] = HeaderCache()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run_or_refuse(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker; Busy (503) at once if every worker is taken."""
        if self._slots.locked():
            raise Busy(
                f"the server is decoding {self.max_requests} large requests already "
                "(--max-codec-requests); retry later"
            )
        return await self._run(fn, *args)

    async def decode(
        self,
        body: RawBody | bytes,
        header_length: int | None,
        check_header: Callable[[RequestHeader], None] | None = None,
    ) -> InferRequest:
        """The request in ``body``; compressed bodies always go to a worker (a small body may
        inflate to megabytes)."""
        if isinstance(body, bytes):
            body = RawBody([body], len(body))
        if body.size <= self.inline_bytes and body.encoding == "identity":
            cache = self._headers if check_header is not None else None
            return parse_infer_request(body.plain(), header_length, check_header, cache=cache)
        return await self.run_or_refuse(_decode_large, body, header_length, check_header)

    async def encode(self, response: InferResponse) -> tuple[bytes, dict[str, str]]:
        if _response_size(response) <= self.inline_bytes:
            return encode_infer_response(response)
        return await self._run(encode_large_response, response)
