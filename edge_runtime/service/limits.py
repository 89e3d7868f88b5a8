"""What a device agrees to do for a round manifest: the limits in the agent's config.

A manifest arrives over the broker, so anyone who can publish there can write one. The agent checks
every training setting in it (at any depth, so every method's own epochs and learning rates are
covered) and the payloads it names against these limits before it fetches or trains anything; out
of range is refused with the reason. The model must be a packaged / tiny name, or a path under the
configured ``models_dir`` (never an arbitrary folder on the device).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edge_runtime.errors import EdgeRuntimeError


class ManifestRefused(EdgeRuntimeError):
    """The manifest asks for something outside the device's limits."""


@dataclass(frozen=True)
class ManifestLimits:
    max_epochs: float = 20.0                       # every "...epochs" setting (local, personal, fusion)
    max_steps: int = 20_000                        # optimizer steps one round may take on this device
    max_lr: float = 0.1                            # every "lr" / "...lr" setting
    max_batch_size: int = 512
    max_seq_len: int = 4096
    max_rank: int = 256                            # LoRA / prompt ranks and lengths
    max_evals: int = 1000                          # search evaluations (FDLoRA's fusion)
    max_payload_bytes: int = 256 * 1024 * 1024     # the global / init adapter the manifest names
    models_dir: Path | None = None                 # model paths must lie under it (names always allowed)

    def check(self, training: dict, payload_sizes: dict[str, int], n_examples: int) -> None:
        """Raise :class:`ManifestRefused` naming the first setting out of range."""
        for name, size in payload_sizes.items():
            if size > self.max_payload_bytes:
                raise ManifestRefused(f"the {name} payload is {size} bytes, over this device's "
                                      f"{self.max_payload_bytes}-byte limit")
        for path, key, value in _numbers(training):
            if "server" in path[:-1]:
                continue   # the server's own optimiser settings: the device never acts on them
            where = ".".join(path)
            if key.endswith("epochs") and value > self.max_epochs:
                raise ManifestRefused(f"{where} = {value} is over this device's limit of {self.max_epochs}")
            if (key == "lr" or key.endswith("_lr")) and value > self.max_lr:
                raise ManifestRefused(f"{where} = {value} is over this device's limit of {self.max_lr}")
            if key.endswith(("batch_size", "batch")) and value > self.max_batch_size:
                raise ManifestRefused(f"{where} = {value} is over this device's limit of {self.max_batch_size}")
            if key.endswith("seq_len") and value > self.max_seq_len:
                raise ManifestRefused(f"{where} = {value} is over this device's limit of {self.max_seq_len}")
            if key in ("rank", "length") and value > self.max_rank:
                raise ManifestRefused(f"{where} = {value} is over this device's limit of {self.max_rank}")
            if key.endswith("_evals") and value > self.max_evals:
                raise ManifestRefused(f"{where} = {value} is over this device's limit of {self.max_evals}")
            if key == "max_steps" and value > self.max_steps:
                raise ManifestRefused(f"{where} = {value} is over this device's limit of {self.max_steps}")
        train = training.get("train") or {}
        epochs, batch = train.get("epochs", 1.0), max(1, int(train.get("batch_size", 16) or 1))
        steps = int(epochs * n_examples / batch + 1) if isinstance(epochs, (int, float)) else 0
        if train.get("max_steps"):
            steps = min(steps, int(train["max_steps"]))
        if steps > self.max_steps:
            raise ManifestRefused(f"train.epochs = {epochs} over {n_examples} local examples at batch {batch} is "
                                  f"{steps} steps, over this device's limit of {self.max_steps}")
        self.check_model(str(training.get("model", "")))

    def check_model(self, model: str) -> None:
        from edge_runtime.training.models import PACKAGED_MODELS, TINY_MODELS

        if model in PACKAGED_MODELS or model in TINY_MODELS:
            return
        if self.models_dir is None:
            raise ManifestRefused(f"model {model!r} is not a known model name ({sorted(PACKAGED_MODELS)}) and this "
                                  f"device has no --models-dir for model paths")
        root = Path(self.models_dir).expanduser().resolve()
        target = (root / model).resolve() if not Path(model).is_absolute() else Path(model).resolve()
        if target != root and root not in target.parents:
            raise ManifestRefused(f"model {model!r} is not under this device's models directory {root}")


def _numbers(d: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str, float]]:
    if isinstance(d, dict):
        for k, v in d.items():
            if isinstance(v, (dict, list)):
                yield from _numbers(v, (*path, str(k)))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield (*path, str(k)), str(k), v


def add_limit_args(p: argparse.ArgumentParser) -> None:
    d = ManifestLimits()
    g = p.add_argument_group("limits", "what this device agrees to do for a round manifest (out of range is "
                                       "refused with the reason)")
    g.add_argument("--max-epochs", type=float, default=d.max_epochs)
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps per round")
    g.add_argument("--max-lr", type=float, default=d.max_lr)
    g.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    g.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    g.add_argument("--max-rank", type=int, default=d.max_rank, help="LoRA rank / prompt length")
    g.add_argument("--max-evals", type=int, default=d.max_evals, help="search evaluations (FDLoRA's fusion)")
    g.add_argument("--max-payload-mb", type=float, default=d.max_payload_bytes / 2**20,
                   help="largest global / init adapter to fetch")
    g.add_argument("--models-dir", type=Path, default=None,
                   help="model paths a manifest may name must lie under this folder (names always allowed)")


def limits_from_args(args: argparse.Namespace) -> ManifestLimits:
    return ManifestLimits(max_epochs=args.max_epochs, max_steps=args.max_steps, max_lr=args.max_lr,
                          max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, max_rank=args.max_rank,
                          max_evals=args.max_evals,
                          max_payload_bytes=int(args.max_payload_mb * 2**20), models_dir=args.models_dir)
