"""Device profiling: the only module that probes the OS (and, later, the GPU)."""

from __future__ import annotations

import os
import platform

import psutil


def basic_profile() -> dict:
    """What a device tells the server in its hello: memory (bytes), CPU count, platform."""
    vm = psutil.virtual_memory()
    return {
        "memory_total": int(vm.total),
        "memory_available": int(vm.available),
        "cpu_count": os.cpu_count() or 1,
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
    }
