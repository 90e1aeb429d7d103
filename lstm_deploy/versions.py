"""Versions from package metadata, read here only: this package's own, and the installed others'.

Torch-free: the manifest, validate's report, the C++ build's stamp and the server's metadata all
read versions through it. `__version__` is read on first use (PEP 562): importlib.metadata costs
a serving process's start several milliseconds that it need not pay until someone asks.
"""

from __future__ import annotations

import functools
from typing import Any

DISTRIBUTION = "lstm-deploy"


def installed(dist: str) -> str | None:
    """The installed version of distribution `dist` ("torch", "onnxruntime"), or None."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def package_version() -> str:
    """lstm-deploy's version; a source tree that is not installed has none, and says 0.0.0."""
    return installed(DISTRIBUTION) or "0.0.0"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return package_version()
    raise AttributeError(f"module 'lstm_deploy.versions' has no attribute {name!r}")
