"""edge_runtime: federated fine-tuning of language models on edge devices (device side + shared code)."""

__version__ = "0.1.0"
