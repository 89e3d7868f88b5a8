"""Local datasets: JSONL / CSV loading with row validation, the built-in WordNet task, tokenisation.

A device's data never leaves it: these functions only read local files. Two row shapes exist:
``{"text": str, "label": str | int}`` (classification) and ``{"prompt": str, "response": str}``
(generation, trained as a causal LM on the response tokens).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch

from edge_runtime.algorithms.partition import partition_dirichlet, split_train_val_test
from edge_runtime.errors import DataError

Kind = Literal["classification", "generation"]
BUILTIN_DATASETS = {"wordnet": "wordnet_noun_supersenses.jsonl.gz"}
_MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True)
class LocalDataset:
    """Examples held on one device.

    ``inputs`` are texts (classification) or prompts (generation); ``targets`` are label ids
    (``int`` in ``range(len(label_names))``) or response strings.
    """

    kind: Kind
    inputs: tuple[str, ...]
    targets: tuple
    label_names: tuple[str, ...] = ()
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Sequence[int]) -> "LocalDataset":
        return LocalDataset(
            self.kind,
            tuple(self.inputs[i] for i in indices),
            tuple(self.targets[i] for i in indices),
            self.label_names,
            self.source,
        )


class Splits(NamedTuple):
    """One device's own train / validation / test examples (never leave the device)."""

    train: LocalDataset
    val: LocalDataset
    test: LocalDataset


def _row_kind(row: dict) -> Kind | None:
    if "text" in row and "label" in row:
        return "classification"
    if "prompt" in row and "response" in row:
        return "generation"
    return None


def _check_row(row: object, where: str) -> tuple[Kind, str, object]:
    """Validate one parsed row; returns (kind, input, target) or raises DataError naming ``where``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'text'+'label' or 'prompt'+'response', "
                        f"got {type(row).__name__}")
    kind = _row_kind(row)
    if kind is None:
        raise DataError(f"{where}: row needs 'text' and 'label', or 'prompt' and 'response'; "
                        f"has keys {sorted(row)}")
    key_in, key_out = ("text", "label") if kind == "classification" else ("prompt", "response")
    value = row[key_in]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key_in}' must be a non-empty string, got {value!r:.60}")
    target = row[key_out]
    if kind == "classification":
        if isinstance(target, bool) or not isinstance(target, (str, int)):
            raise DataError(f"{where}: 'label' must be a string or an integer, got {target!r:.60}")
        if isinstance(target, int) and target < 0:
            raise DataError(f"{where}: integer 'label' must be >= 0, got {target}")
        if isinstance(target, str) and not target.strip():
            raise DataError(f"{where}: 'label' is empty")
    elif not isinstance(target, str) or not target:
        raise DataError(f"{where}: 'response' must be a non-empty string, got {target!r:.60}")
    return kind, value, target


def _iter_rows(path: Path, text: str):
    """Yield (where, row-or-exception) for a JSONL or CSV file's data rows."""
    if path.suffix.lower() == ".csv" or path.name.lower().endswith(".csv.gz"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None:
            return
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                yield where, DataError(f"{where}: wrong number of columns for header {reader.fieldnames}")
                continue
            label = row.get("label")
            if label is not None and label.strip().isdigit():
                row["label"] = int(label)
            yield where, row
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")


def load_dataset(path: str | Path, label_names: Sequence[str] | None = None) -> LocalDataset:
    """Load and validate a JSONL or CSV file (optionally gzip'd).

    ``label_names`` fixes the label space (all devices of a federation must share one); labels
    outside it are errors. Without it, string labels are sorted and integer labels are
    ``0..max``. All bad rows are reported together (up to 20), each with file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    raw = path.read_bytes()
    try:
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text{' (gzip)' if path.suffix == '.gz' else ''}: {exc}") from exc

    errors: list[str] = []
    kind: Kind | None = None
    inputs: list[str] = []
    targets: list = []
    for where, row in _iter_rows(path, text):
        try:
            if isinstance(row, Exception):
                raise row
            row_kind, value, target = _check_row(row, where)
            if kind is None:
                kind = row_kind
            elif row_kind != kind:
                raise DataError(f"{where}: a {row_kind} row in a {kind} file")
        except DataError as exc:
            errors.append(str(exc))
            continue
        inputs.append(value)
        targets.append(target)
    if errors:
        more = f"\n... and {len(errors) - _MAX_REPORTED_ERRORS} more" if len(errors) > _MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} bad row(s) in {path}:\n" + "\n".join(errors[:_MAX_REPORTED_ERRORS]) + more)
    if kind is None:
        raise DataError(f"{path}: no data rows")
    if kind == "generation":
        return LocalDataset(kind, tuple(inputs), tuple(targets), (), str(path))
    names, ids = _encode_labels(targets, label_names, path)
    return LocalDataset(kind, tuple(inputs), ids, names, str(path))


def _encode_labels(labels: list, label_names: Sequence[str] | None, path: Path) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if label_names is not None:
        names = tuple(label_names)
        index = {n: i for i, n in enumerate(names)}
        ids, outside, rows = [], set(), 0
        for lab in labels:
            if isinstance(lab, int) and lab < len(names):
                ids.append(lab)
            elif isinstance(lab, str) and lab in index:
                ids.append(index[lab])
            else:
                outside.add(lab)
                rows += 1
        if outside:
            shown = sorted(map(repr, outside))
            raise DataError(f"{path}: {rows} row(s) have labels outside the run's {len(names)} labels: "
                            f"{', '.join(shown[:10])}{' ...' if len(shown) > 10 else ''}; the run's label space "
                            f"(the server's --labels, e.g. a label list file labels.json) must cover every device's "
                            f"labels")
        return names, tuple(ids)
    if all(isinstance(lab, int) for lab in labels):
        return tuple(str(i) for i in range(max(labels) + 1)), tuple(labels)
    if any(isinstance(lab, int) for lab in labels):
        raise DataError(f"{path}: labels mix integers and strings; use one or the other")
    names = tuple(sorted(set(labels)))
    index = {n: i for i, n in enumerate(names)}
    return names, tuple(index[lab] for lab in labels)


def load_builtin(name: str, with_lemmas: bool = False) -> LocalDataset:
    """Load a dataset shipped with the package (``wordnet``: 82,115 noun glosses, 26 supersenses)."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {name!r}; known: {sorted(BUILTIN_DATASETS)}")
    ref = resources.files("edge_runtime.data") / BUILTIN_DATASETS[name]
    rows = [json.loads(line) for line in gzip.decompress(ref.read_bytes()).decode("utf-8").splitlines()]
    inputs = [f"{r['lemmas'][0]}: {r['text']}" if with_lemmas else r["text"] for r in rows]
    names, ids = _encode_labels([r["label"] for r in rows], None, Path(name))
    return LocalDataset("classification", tuple(inputs), ids, names, f"builtin:{name}")


def resolve_dataset(spec: str, label_names: Sequence[str] | None = None) -> LocalDataset:
    """``wordnet`` (built-in) or a path to a JSONL / CSV file."""
    if spec in BUILTIN_DATASETS:
        return load_builtin(spec)
    return load_dataset(spec, label_names)


def device_splits(data: LocalDataset, fractions: tuple[float, float, float], rng,
                  test: LocalDataset | None = None, val: LocalDataset | None = None) -> Splits:
    """A device's train / validation / test: carved from ``data`` by ``fractions``, except the parts the
    device has its own files for (``test`` / ``val``), which are used whole and carve nothing out of ``data``."""
    f_train, f_val, f_test = fractions
    f_val, f_test = (0.0 if val is not None else f_val), (0.0 if test is not None else f_test)
    total = f_train + f_val + f_test
    tr, va, te = split_train_val_test(list(range(len(data))), (f_train / total, f_val / total, f_test / total), rng)
    return Splits(data.subset(tr), val if val is not None else data.subset(va),
                  test if test is not None else data.subset(te))


def resolve_labels(spec: str) -> tuple[str, ...]:
    """A run's label space from ``spec``: ``wordnet``; a label file (``.json``: a list of strings, ``.txt``: one
    label a line); a data file (its labels: every device's data must lie within them); or ``a,b,c``."""
    if spec in BUILTIN_DATASETS:
        return load_builtin(spec).label_names
    path = Path(spec)
    if path.suffix.lower() in (".json", ".txt") and path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
            labels = json.loads(text) if path.suffix.lower() == ".json" else [x.strip() for x in text.splitlines()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read the label list: {exc}") from exc
        if path.suffix.lower() == ".txt":
            labels = [x for x in labels if x]
        if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
            raise DataError(f"{path}: a label file must hold a JSON list of non-empty strings (or, as .txt, one "
                            f"label a line)")
        if len(set(labels)) != len(labels):
            dup = sorted({x for x in labels if labels.count(x) > 1})
            raise DataError(f"{path}: labels listed twice: {dup[:5]}")
        if len(labels) < 2:
            raise DataError(f"{path}: a classification run needs at least 2 labels, got {len(labels)}")
        return tuple(labels)
    if path.is_file():
        return load_dataset(path).label_names
    if "," in spec:
        labels = tuple(x.strip() for x in spec.split(",") if x.strip())
        if len(labels) >= 2:
            return labels
    raise DataError(f"labels {spec!r}: not 'wordnet', a label file (.json list / .txt lines), a data file "
                    f"or a comma-separated list of at least 2 labels")


def example_lengths(tokenizer, dataset: LocalDataset, max_length: int) -> list[int]:
    """Tokens each example takes in :func:`encode_batch` (truncated to ``max_length``)."""
    if dataset.kind == "classification":
        ids = tokenizer(list(dataset.inputs), truncation=True, max_length=max_length)["input_ids"]
        return [len(x) for x in ids]
    prompts = tokenizer(list(dataset.inputs), add_special_tokens=True)["input_ids"]
    answers = tokenizer(list(dataset.targets), add_special_tokens=False)["input_ids"]
    eos = 1 if tokenizer.eos_token_id is not None else 0
    return [min(max_length, len(p) + len(r) + eos) for p, r in zip(prompts, answers)]


def encode_batch(tokenizer, dataset: LocalDataset, indices: Sequence[int], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise examples ``indices`` into padded tensors (dynamic padding to the batch's longest).

    Classification: ``input_ids, attention_mask: (B, T)``, ``labels: (B,)``.
    Generation: prompt + response + EOS, ``labels: (B, T)`` with -100 on prompt and padding,
    so the loss and accuracy cover the response tokens only.
    """
    if dataset.kind == "classification":
        enc = tokenizer([dataset.inputs[i] for i in indices], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        enc["labels"] = torch.tensor([dataset.targets[i] for i in indices], dtype=torch.long)
        return enc
    eos = tokenizer.eos_token_id
    rows, label_rows = [], []
    for i in indices:
        p = tokenizer(dataset.inputs[i], add_special_tokens=True)["input_ids"]
        r = tokenizer(dataset.targets[i], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p + r)[:max_length]
        labs = ([-100] * len(p) + r)[:max_length]
        rows.append(ids)
        label_rows.append(labs)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for j, (ids, labs) in enumerate(zip(rows, label_rows)):
        input_ids[j, : len(ids)] = torch.tensor(ids)
        attention[j, : len(ids)] = 1
        labels[j, : len(labs)] = torch.tensor(labs)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def local_splits(data: LocalDataset, fractions: tuple[float, float, float], seed: int, device_id: str,
                 test: LocalDataset | None = None, val: LocalDataset | None = None) -> Splits:
    """A device's own train / validation / test (:func:`device_splits`), seeded by the run's seed and the
    device id only: an agent and a simulated device with the same data split it the same way."""
    rng = np.random.default_rng([seed, zlib.crc32(device_id.encode())])
    return device_splits(data, fractions, rng, test=test, val=val)


def federation_shards(full: LocalDataset, devices: int, alpha: float, max_examples: int | None,
                      seed: int) -> list[LocalDataset]:
    """``full`` (a random ``max_examples`` of it) split over ``devices``: a Dirichlet(``alpha``) label
    split for classification, an even random one for generation. ``edge-runtime demo`` writes these
    shards to the agents' data files and ``edge-runtime simulate`` trains on them, so both federate the
    same data."""
    rng = np.random.default_rng(seed)
    if max_examples is not None and max_examples < len(full):
        full = full.subset(sorted(rng.choice(len(full), max_examples, replace=False).tolist()))
    if full.kind == "classification":
        parts = partition_dirichlet(full.targets, devices, alpha, rng, min_per_device=min(10, len(full) // devices))
    else:   # no labels to skew
        parts = [p.tolist() for p in np.array_split(rng.permutation(len(full)), devices)]
    return [full.subset(p) for p in parts]


def concat_datasets(parts: Sequence[LocalDataset], source: str = "union") -> LocalDataset:
    """The examples of ``parts`` (one kind and label space) as one dataset, in order."""
    first = parts[0]
    return LocalDataset(first.kind, tuple(x for p in parts for x in p.inputs),
                        tuple(y for p in parts for y in p.targets), first.label_names, source)
