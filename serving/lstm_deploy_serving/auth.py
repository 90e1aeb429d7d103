"""An opt-in API key: every route but ``/v2/health/*`` needs ``Authorization: Bearer KEY``.

Health stays open so that load balancers and orchestrators can probe without the key. The key is
compared in constant time and never logged, printed or kept in a repr.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .protocol import JSON_CONTENT_TYPE, error_body

API_KEY_ENV = "LSTM_DEPLOY_API_KEY"
OPEN_PREFIX = "/v2/health/"


class ApiKeyError(ValueError):
    """The API key given cannot be used (the message never contains it)."""


def _checked(key: str, source: str) -> str:
    # A header value carries the key: visible ASCII only (RFC 6750's b64token is a subset).
    if not key:
        raise ApiKeyError(f"the API key from {source} is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise ApiKeyError(f"the API key from {source} must be printable ASCII without spaces")
    return key


def resolve_api_key(
    key: str | None, key_file: Path | None, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The key from ``--api-key``, else ``--api-key-file`` (stripped), else the environment."""
    if key is not None and key_file is not None:
        raise ApiKeyError("give --api-key or --api-key-file, not both")
    if key is not None:
        return _checked(key, "--api-key")
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ApiKeyError(f"cannot read the API key file {key_file}: {e}") from None
        return _checked(text.strip(), str(key_file))
    if API_KEY_ENV in environ:
        return _checked(environ[API_KEY_ENV], API_KEY_ENV)
    return None


def bearer_matches(authorization: bytes, key: bytes) -> bool:
    """Whether an ``Authorization`` value (HTTP header, gRPC metadata) is ``Bearer KEY``."""
    scheme, _, token = authorization.strip().partition(b" ")
    # compare_digest runs in time independent of where the bytes differ.
    return hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer"


class ApiKeyAuth:
    """ASGI middleware: 401 with Triton's ``{"error": "..."}`` unless the bearer token matches."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("ascii")

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = next((v for k, v in headers if k == b"authorization"), b"")
        return bearer_matches(value, self._key)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["path"].startswith(OPEN_PREFIX)
            or self._authorized(scope["headers"])
        ):
            await self.app(scope, receive, send)
            return
        body = error_body("missing or wrong API key: send the header 'Authorization: Bearer KEY'")
        headers = [
            (b"content-type", JSON_CONTENT_TYPE.encode()),
            (b"content-length", b"%d" % len(body)),
            (b"www-authenticate", b'Bearer realm="lstm-deploy"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


__all__ = [
    "API_KEY_ENV",
    "ApiKeyAuth",
    "ApiKeyError",
    "bearer_matches",
    "resolve_api_key",
]
