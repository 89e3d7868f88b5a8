"""Evaluation: loss and accuracy (label accuracy, or response-token accuracy for generation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edge_runtime.service import lifecycle
from edge_runtime.training.data import LocalDataset, encode_batch


@dataclass(frozen=True)
class EvalResult:
    loss: float                 # mean cross-entropy per example (classification) or token (generation)
    accuracy: float             # in [0, 1]
    n: int                      # examples evaluated
    correct: tuple[float, ...] = field(default=(), repr=False)  # per-example accuracy, in data order


@torch.inference_mode()
def evaluate(model: torch.nn.Module, tokenizer, data: LocalDataset, batch_size: int = 64,
             max_seq_len: int = 64) -> EvalResult:
    """Evaluate ``model`` on every example of ``data`` (all layers, no dropout)."""
    if len(data) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    model.eval()
    total_loss, total_tokens = 0.0, 0
    per_example: list[float] = []
    for start in range(0, len(data), batch_size):
        lifecycle.progress()
        idx = list(range(start, min(start + batch_size, len(data))))
        batch = encode_batch(tokenizer, data, idx, max_seq_len)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if data.kind == "classification":
            total_loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            total_tokens += len(idx)
            per_example += (logits.argmax(-1) == labels).float().tolist()
        else:
            # token t predicts token t+1
            logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            total_loss += torch.nn.functional.cross_entropy(
                logits[mask], labels[mask], reduction="sum").item()
            total_tokens += int(mask.sum())
            hits = ((logits.argmax(-1) == labels) & mask).sum(-1).float()
            per_example += (hits / mask.sum(-1).clamp(min=1)).tolist()
    loss = total_loss / max(total_tokens, 1)
    return EvalResult(loss, sum(per_example) / len(per_example), len(per_example), tuple(per_example))
