"""PEFT methods, one per module; ``METHODS`` maps a training profile's ``method`` to its module."""

from edge_runtime.methods import lora

METHODS = {"lora": lora}
