"""Seeded use of torch's global generator, safe when several devices share a process.

Model construction (random init of a tiny model, a new task head, LoRA's A matrices) and dropout
masks draw from torch's one global CPU generator. A device that runs in its own process (every real
deployment) owns it; devices run as threads of one process (in-process fleets in tests and the
demo's simulation) share it, and one thread seeding or restoring it while another draws would give
a device weights or masks its seed does not promise: devices that believe they share a base model
would not. So every seeded use takes :data:`RNG_LOCK`, and training takes it only when the model
draws at all (:func:`stochastic`), so that dropout-free devices still train in parallel.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global generator seeded to ``seed``, alone; restore it afterwards."""
    with RNG_LOCK, torch.random.fork_rng():
        torch.manual_seed(int(seed))
        yield


def stochastic(model: torch.nn.Module) -> bool:
    """Whether ``model``'s training forward draws random numbers (dropout anywhere, attention's too)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        cfg = getattr(m, "config", None)
        if cfg is not None and float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
            return True
    return False
