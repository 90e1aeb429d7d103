"""lstm_deploy_serving: serve an lstm-deploy bundle over the KServe v2 protocol, as Triton does.

Reads a bundle's ``manifest.json`` and ``model.onnx`` and runs it with ONNX Runtime; never imports
torch. Start it with ``lstm-deploy serve BUNDLE`` (or ``python -m lstm_deploy_serving serve``).

The batching core and the sequence-state store are plain numpy, usable without the server
(e.g. in a Triton python-backend ``model.py``): see ``batching`` and ``sequences``.
"""

from typing import Any

from lstm_deploy import versions

# numpy only below: the Triton python-backend model.py imports this package from a copy of
# its numpy-only modules (batching, errors, sequences), without uvicorn or onnxruntime.
from .batching import Layout, MergePlan
from .errors import ServingError
from .sequences import SequenceStore

__all__ = ["Layout", "MergePlan", "SequenceStore", "ServingError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read on first use: see lstm_deploy.versions
        return versions.package_version()
    raise AttributeError(f"module 'lstm_deploy_serving' has no attribute {name!r}")
