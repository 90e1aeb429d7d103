"""Export: the deployed graphs, the exporters (TorchScript, ONNX), the bundle writer, Triton."""
