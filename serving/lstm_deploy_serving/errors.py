"""One error base class that carries its HTTP status.

Every layer raises these (the codecs, the batching core, the sequence store, the service); the app
has a single handler that turns any of them into Triton's ``{"error": "..."}`` body with
``status``. They depend on nothing HTTP-specific, so code reused outside the server (a Triton
python-backend ``model.py``) can map them onto its own error type.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: ``str(error)`` is the message the client sees, ``status`` its HTTP status."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    """The request is malformed or does not fit the model's signature (400)."""

    status = 400


class NotFound(ServingError):
    """Unknown model, version or route (404)."""

    status = 404


class PayloadTooLarge(ServingError):
    """The request body is over the configured limit (413)."""

    status = 413


class Unavailable(ServingError):
    """Not ready, shutting down, queue full or request timed out in the queue (503)."""

    status = 503


class ServerFault(ServingError):
    """A real fault in the server or the runtime (500)."""

    status = 500
