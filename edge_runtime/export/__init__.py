"""Export of trained adapters for on-device inference (ONNX)."""
