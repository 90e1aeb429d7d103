"""ONNX Runtime: load ``model.onnx`` and predict on numpy. The runtime is an explicit choice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lstm_deploy.bundle import BundleError

from .model_spec import ModelSpec

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class OnnxModel:
    """One ONNX Runtime session over a bundle's ``model.onnx``.

    Args:
        path: the bundle's model.onnx (or model.int8.onnx), verified against the manifest.
        spec: the manifest's signature, which the graph's inputs must match.
        providers: execution providers, in order of preference; CPU unless asked otherwise.
        intra_op_threads: threads per run (0: ONNX Runtime's choice, one per core).
    """

    def __init__(
        self,
        path: Path,
        spec: ModelSpec,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # No CPU arena: it keeps the peak of the largest run for the session's lifetime (690 MB
        # after one [64, 8192, 8] request); plain malloc hands it back: RSS is back within 70 MB
        # of where it was within a second, at no measurable cost on `lstm-deploy loadtest`.
        options.enable_cpu_mem_arena = False
        # No spinning: ONNX Runtime's idle intra-op threads otherwise busy-wait for the next run,
        # on the cores the event loop needs (perf_analyzer, 16 clients, 2 cores: the server's CPU
        # 167% -> 110%, its throughput +14%).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=list(providers)
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"onnxruntime cannot load {path}: {e}") from None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        wanted = {t.name for t in spec.inputs}
        if graph_inputs != wanted:
            raise BundleError(
                f"{path} has inputs {sorted(graph_inputs)}, the manifest says {sorted(wanted)}"
            )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def predict(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once on a complete, batch-first set of inputs."""
        values = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, values, strict=True))
