"""In-process federated simulation: N devices and a FedAvg server in one process, no broker.

The same pieces the real system uses (data partitioning, the method's hooks: build, initial
global, local training, personalisation, trainable state; weighted FedAvg) run in a loop; per
round it logs global test accuracy, mean device accuracy (the global model on each device's own
test split), mean personalised accuracy for methods with a personal model, loss and seconds,
then writes ``history.json``, ``accuracy.png`` and the final global adapter (peft format).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save as safetensors_save

from edge_runtime.algorithms.aggregation import Update
from edge_runtime.atomic_io import replace_dir_atomic
from edge_runtime.algorithms.partition import label_histogram, partition_dirichlet, split_train_val_test
from edge_runtime.errors import ConfigError
from edge_runtime.export.adapter_folder import finish_adapter_folder
from edge_runtime.methods import METHODS
from edge_runtime.methods.droppeft import DropPEFTConfig
from edge_runtime.methods.fdlora import FdloraConfig
from edge_runtime.methods.federa import FederaConfig
from edge_runtime.methods.fedpeptao import FedPepTAOConfig
from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.methods.prompt import PromptConfig
from edge_runtime.methods.personal import PersonalState
from edge_runtime.report import plot_accuracy, write_history
from edge_runtime.training.data import LocalDataset, Splits, device_splits, resolve_dataset
from edge_runtime.training.evaluate import EvalResult, evaluate
from edge_runtime.training.models import resolve_model_source
from edge_runtime.training.spec import TrainingSpec, build_model, with_assignment
from edge_runtime.training.trainer import TrainConfig

log = logging.getLogger("edge_runtime.simulate")


@dataclass(frozen=True)
class SimulationConfig:
    model: str = "minilm-l6"
    data: str = "wordnet"                      # built-in name or a JSONL/CSV path
    device_data: tuple[str, ...] = ()          # one file per device instead of partitioning `data`
    device_test_data: tuple[str, ...] = ()     # each device's own test file (else 10% of its device_data)
    device_val_data: tuple[str, ...] = ()      # each device's own validation file (else 10% of its device_data)
    method: str = "lora"
    quantization: str = "fp32"                 # the base's linear weights: fp32, nf4, int8
    devices: int = 4
    rounds: int = 3
    alpha: float = 0.5                         # Dirichlet concentration of the label split
    max_examples: int | None = 4000            # random subset of `data` before partitioning
    participation: float = 1.0                 # fraction of devices sampled each round
    device_memory: tuple[int, ...] = ()        # bytes each device may train in (cycled); () = unknown
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    eval_batch_size: int = 64
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraMethodConfig = field(default_factory=LoraMethodConfig)
    federa: FederaConfig = field(default_factory=FederaConfig)
    fdlora: FdloraConfig = field(default_factory=FdloraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    fedpeptao: FedPepTAOConfig = field(default_factory=FedPepTAOConfig)
    droppeft: DropPEFTConfig = field(default_factory=DropPEFTConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.devices < 1 and not self.device_data:
            raise ConfigError(f"devices must be >= 1, got {self.devices}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if not 0 < self.participation <= 1:
            raise ConfigError(f"participation must be in (0, 1], got {self.participation}")
        if any(not isinstance(m, int) or m <= 0 for m in self.device_memory):
            raise ConfigError(f"device_memory must be positive byte counts, got {list(self.device_memory)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1 or None, got {self.max_examples}")


@dataclass
class DeviceData:
    device_id: str
    train: LocalDataset
    val: LocalDataset
    test: LocalDataset
    personal: PersonalState | None = None   # what the method keeps on the device between rounds

    @property
    def splits(self) -> Splits:
        return Splits(self.train, self.val, self.test)


def prepare_devices(cfg: SimulationConfig) -> list[DeviceData]:
    """Load the data and give each simulated device its own train / val / test split."""
    rng = np.random.default_rng(cfg.seed)
    own = {"test": cfg.device_test_data, "val": cfg.device_val_data}   # a device's own held-out files
    for k, files in own.items():
        if files and len(files) != len(cfg.device_data):
            raise ConfigError(f"device_{k}_data: {len(files)} file(s) for {len(cfg.device_data)} device_data "
                              f"file(s); give one per device, in the same order")
    if cfg.device_data:
        every = [*cfg.device_data, *cfg.device_test_data, *cfg.device_val_data]
        sets = [resolve_dataset(p) for p in every]
        if len({d.kind for d in sets}) != 1:
            raise ConfigError("device data files mix classification and generation rows")
        if sets[0].kind == "classification":  # one label space for the whole federation
            names = sorted({n for d in sets for n in d.label_names})
            sets = [resolve_dataset(p, names) for p in every]
        n = len(cfg.device_data)
        tests, vals = sets[n:n + len(cfg.device_test_data)], sets[n + len(cfg.device_test_data):]
        devices = []
        for k, ds in enumerate(sets[:n]):
            sp = device_splits(ds, cfg.split, rng, test=tests[k] if tests else None, val=vals[k] if vals else None)
            devices.append(DeviceData(f"dev{k:02d}", sp.train, sp.val, sp.test))
        return devices
    else:
        full = resolve_dataset(cfg.data)
        if cfg.max_examples is not None and cfg.max_examples < len(full):
            full = full.subset(sorted(rng.choice(len(full), cfg.max_examples, replace=False).tolist()))
        if full.kind == "classification":
            parts = partition_dirichlet(full.targets, cfg.devices, cfg.alpha, rng,
                                        min_per_device=min(10, len(full) // cfg.devices))
        else:  # no labels to skew: an even random split
            parts = [p.tolist() for p in np.array_split(rng.permutation(len(full)), cfg.devices)]
        if cfg.device_test_data or cfg.device_val_data:
            raise ConfigError("device_test_data / device_val_data go with device_data (one file per device)")
        shards = [(full, p) for p in parts]
    devices = []
    for k, (ds, idx) in enumerate(shards):
        tr, va, te = split_train_val_test(idx, cfg.split, rng)
        devices.append(DeviceData(f"dev{k:02d}", ds.subset(tr), ds.subset(va), ds.subset(te)))
    return devices


def _concat(parts: list[LocalDataset]) -> LocalDataset:
    first = parts[0]
    return LocalDataset(first.kind, tuple(x for p in parts for x in p.inputs),
                        tuple(y for p in parts for y in p.targets), first.label_names, "union")


def _per_device_accuracy(result: EvalResult, sizes: list[int]) -> list[float]:
    out, start = [], 0
    for n in sizes:
        chunk = result.correct[start:start + n]
        out.append(sum(chunk) / n if n else float("nan"))
        start += n
    return out


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Size of ``state`` as the safetensors bytes a device would upload."""
    return len(safetensors_save({k: v.contiguous() for k, v in state.items()}))


def run_simulation(cfg: SimulationConfig, out_dir: Path | None, progress: bool = True,
                   on_round: Callable[[dict], None] | None = None) -> dict:
    """Run ``cfg.rounds`` FedAvg rounds; returns the history (also written to ``out_dir``)."""
    t_start = time.perf_counter()
    devices = prepare_devices(cfg)
    kind = devices[0].train.kind
    task = "classification" if kind == "classification" else "causal-lm"
    label_names = devices[0].train.label_names
    corpus = [t for d in devices for t in d.train.inputs + d.train.targets if isinstance(t, str)]
    spec = TrainingSpec(model=cfg.model, task=task, labels=tuple(label_names) if kind == "classification" else (),
                        method=cfg.method, quantization=cfg.quantization, lora=cfg.lora, federa=cfg.federa, fdlora=cfg.fdlora, prompt=cfg.prompt,
                        fedpeptao=cfg.fedpeptao, droppeft=cfg.droppeft, train=cfg.train,
                        split=cfg.split, seed=cfg.seed,
                        tokenizer_corpus=tuple(corpus) if resolve_model_source(cfg.model).is_tiny else ())
    method = METHODS[cfg.method]
    model, tokenizer = build_model(spec)
    global_state = method.initial_global(model, spec)  # devices share this model: prepared once
    selection = None
    if method.scoring:  # a score round: each device scores layers on its data, the server picks
        reports = [(method.score(model, tokenizer, d.splits, spec, seed=cfg.seed * 1000 + k), float(len(d.train)))
                   for k, d in enumerate(devices)]
        global_state, selection = method.select(global_state, reports, spec)
        method.load_trainable_state(model, global_state)
        log.info("score round: shared layers %s", selection.get("shared_layers"))
    server_state: dict = {}
    update_bytes = state_nbytes(global_state)
    test_union = _concat([d.test for d in devices])
    test_sizes = [len(d.test) for d in devices]
    n_params = sum(v.numel() for v in global_state.values())
    log.info("model %s (%s), method %s: %d trainable params (%.2f MB per update); %d devices, "
             "train sizes %s", cfg.model, task, cfg.method, n_params, update_bytes / 1e6, len(devices),
             [len(d.train) for d in devices])

    def evaluate_global() -> tuple[EvalResult, list[float]]:
        res = evaluate(model, tokenizer, test_union, cfg.eval_batch_size, cfg.train.max_seq_len)
        return res, _per_device_accuracy(res, test_sizes)

    def personalise_all() -> dict:
        """Each device's own model from the current global (methods with a personal part only)."""
        rows, t0 = [], time.perf_counter()
        for dev in devices:
            metrics, dev.personal = method.personalise(model, tokenizer, dev.splits, spec, dev.personal,
                                                       cfg.eval_batch_size)
            rows.append(metrics)
        method.load_trainable_state(model, global_state)
        if not rows or not rows[0]:
            return {}
        acc = [r["personal_accuracy"] for r in rows]
        return {"mean_personal_accuracy": float(np.nanmean(acc)), "device_personal_accuracy": acc,
                **({"fusion": [(r["fusion_a"], r["fusion_b"]) for r in rows]} if "fusion_a" in rows[0] else {}),
                "personalise_seconds": time.perf_counter() - t0}

    def row_for(r: int, res: EvalResult, dev_acc: list[float], **extra) -> dict:
        return {"round": r, "global_accuracy": res.accuracy, "mean_device_accuracy": float(np.nanmean(dev_acc)),
                "device_accuracy": dev_acc, "loss": res.loss, **extra, **personalise_all()}

    res0, dev0 = evaluate_global()
    rounds = [row_for(0, res0, dev0, train_loss=None, seconds=0.0, participants=[], bytes_up=0, bytes_down=0)]
    if on_round:
        on_round(rounds[0])
    rng = np.random.default_rng(cfg.seed + 1)
    n_pick = max(1, round(cfg.participation * len(devices)))
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        picked = sorted(rng.choice(len(devices), n_pick, replace=False).tolist())
        assignments, chosen = method.assign(server_state, {devices[k].device_id: _sim_profile(cfg, k) for k in picked},
                                            spec, r)
        updates, train_losses = [], []
        for k in picked:
            dev = devices[k]
            method.load_trainable_state(model, global_state)
            result, dev.personal = method.local_train(model, tokenizer, dev.splits,
                                                      with_assignment(spec, assignments.get(dev.device_id)),
                                                      seed=cfg.seed * 1000 + r * 100 + k, personal=dev.personal,
                                                      progress=progress, desc=f"round {r} {dev.device_id}")
            updates.append(Update(dev.device_id, method.trainable_state(model), float(len(dev.train)), result.steps,
                                  {**result.metrics, "train_seconds": result.seconds}))
            train_losses.append(result.mean_loss)
        configurator = None   # the configurator's choices (DropPEFT) and what they earned
        if chosen:
            configurator = {"assignments": chosen, "rewards": method.rewards(updates),
                            "train_seconds": {u.device_id: u.metrics["train_seconds"] for u in updates}}
        global_state, server_state = method.aggregate(global_state, updates, server_state, spec, len(devices))
        method.load_trainable_state(model, global_state)
        train_seconds = time.perf_counter() - t0
        res, dev_acc = evaluate_global()
        row = row_for(r, res, dev_acc, train_loss=float(np.mean(train_losses)), seconds=train_seconds,
                      participants=[devices[k].device_id for k in picked], bytes_up=sum(state_nbytes(u.tensors) for u in updates),
                      bytes_down=state_nbytes(global_state) * len(picked),
                      **({"configurator": configurator} if configurator else {}))
        rounds.append(row)
        if on_round:
            on_round(row)

    history = {
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "task": task,
        "label_names": list(label_names),
        "devices": [{"id": d.device_id, "train": len(d.train), "val": len(d.val), "test": len(d.test)}
                    for d in devices],
        "label_histogram": (label_histogram([y for d in devices for y in d.train.targets],
                                            _shard_ranges(devices), len(label_names)).tolist()
                            if kind == "classification" else None),
        "trainable_params": n_params,
        "update_bytes": update_bytes,
        "selection": selection,
        "rounds": rounds,
        "total_seconds": time.perf_counter() - t_start,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_history(out_dir, history)
        curves = {"global test accuracy": [(x["round"], x["global_accuracy"]) for x in rounds],
                  "mean device accuracy": [(x["round"], x["mean_device_accuracy"]) for x in rounds]}
        if "mean_personal_accuracy" in rounds[0]:
            curves["mean personalised accuracy"] = [(x["round"], x["mean_personal_accuracy"]) for x in rounds]
        plot_accuracy(out_dir / "accuracy.png", curves,
                      title=f"{cfg.model} + {cfg.method}, {len(devices)} devices, alpha={cfg.alpha}")

        card = {"rounds": cfg.rounds, "devices": len(devices), "accuracy": rounds[-1]["global_accuracy"],
                "accuracy_on": "the union of the simulated devices' test splits"}

        def save_adapter(folder: Path) -> None:
            method.save_adapter(model, folder)
            finish_adapter_folder(folder, model=cfg.model, task=task, labels=label_names, method=cfg.method,
                                  tokenizer=tokenizer, card=card, seed=cfg.seed)

        replace_dir_atomic(out_dir / "global_adapter", save_adapter)
        history["adapter_dir"] = str(out_dir / "global_adapter")
    return history


def _sim_profile(cfg: SimulationConfig, k: int) -> dict:
    """What simulated device ``k`` would say in its hello about memory (``device_memory``, cycled)."""
    return {"memory_budget": cfg.device_memory[k % len(cfg.device_memory)]} if cfg.device_memory else {}


def _shard_ranges(devices: list[DeviceData]) -> list[list[int]]:
    out, start = [], 0
    for d in devices:
        out.append(list(range(start, start + len(d.train))))
        start += len(d.train)
    return out
