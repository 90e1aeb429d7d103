"""Versions from package metadata, read once here: this package's own, and the installed others'.

Torch-free: the manifest, validate's report, the C++ build's stamp and the server's metadata all
read versions through it.
"""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "lstm-deploy"


def installed(dist: str) -> str | None:
    """The installed version of distribution `dist` ("torch", "onnxruntime"), or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# A source tree that is not installed has no metadata: 0.0.0 says so rather than guessing.
__version__ = installed(DISTRIBUTION) or "0.0.0"
