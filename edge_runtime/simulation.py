"""In-process federated simulation: a fleet's own round code, called directly instead of over MQTT.

Each simulated device is what an agent is: its own shard of the data (:func:`federation_shards`, the
shards ``edge-runtime demo`` gives its agents), split with the agent's seed (:func:`local_splits`), and
its round is :func:`edge_runtime.round.device.device_round` with the agent's training seeds. The server
side is the coordinator's: :func:`select_participants`, the method's configurator, the checked
aggregate, :func:`round_row` and :func:`record_eval`; payloads go through the wire codec both ways.
So the same data and settings give the same accuracies here and over a broker
(``tests/integration/test_simulation_equals_fleet.py``).

As in a fleet, the global after round r is evaluated by round r+1's participants on their own test
splits before they train, and a last evaluation round follows the final one; a row's accuracy is
the device-weighted mean of those evaluations. What the broker adds and this leaves out: deadlines,
quorum, re-sends, restarts and out-of-memory step-downs (every device trains as asked and reports).
The devices take turns on one model. Outputs: the server's ``report.json``, ``report.png`` and
``global_adapter/`` (:mod:`edge_runtime.report`), plus ``history.json`` with the simulation's detail.
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

from edge_runtime.algorithms.compression import CompressionConfig
from edge_runtime.algorithms.dp import DPConfig
from edge_runtime.algorithms.fedopt import FedOptConfig
from edge_runtime.algorithms.partition import label_histogram
from edge_runtime.algorithms.robust import RobustConfig
from edge_runtime.errors import ConfigError
from edge_runtime.methods import METHODS, config_sections
from edge_runtime.methods.personal import PersonalState
from edge_runtime.protocol.codec import decode_tensors, encode_tensors
from edge_runtime.report import export_adapter, write_history, write_report
from edge_runtime.round.device import DeviceReport, device_round
from edge_runtime.round.phases import round_phases
from edge_runtime.round.server import (aggregate_checked, as_update,
                                       configurator_row, finite_metrics,
                                       initial_row, note_privacy, record_eval,
                                       round_row, score_reports,
                                       select_participants)
from edge_runtime.round.wire import (decode_update, encode_global,
                                     encode_update, raw_bytes)
from edge_runtime.training.data import (LocalDataset, Splits,
                                        federation_shards, local_splits,
                                        resolve_dataset)
from edge_runtime.training.models import resolve_model_source
from edge_runtime.training.spec import (TrainingSpec, build_model,
                                        with_assignment)
from edge_runtime.training.evaluate import EvalConfig
from edge_runtime.training.trainer import TrainConfig

log = logging.getLogger("edge_runtime.simulate")


class _SimulationChecks:
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


# A simulation's settings: the data and the federation, then one section per registered method (as in
# TrainingSpec, from the registry) and the local training loop.
SimulationConfig = dataclasses.make_dataclass("SimulationConfig", [
    ("model", str, field(default="minilm-l6")),
    ("data", str, field(default="wordnet")),                       # built-in name or a JSONL/CSV path
    ("device_data", tuple, field(default=())),                     # one file per device instead of sharding `data`
    ("device_test_data", tuple, field(default=())),                # each device's own test file
    ("device_val_data", tuple, field(default=())),                 # each device's own validation file
    ("method", str, field(default="lora")),
    ("quantization", str, field(default="fp32")),                  # the base's linear weights: fp32, nf4, int8
    ("devices", int, field(default=4)),
    ("rounds", int, field(default=3)),
    ("alpha", float, field(default=0.5)),                          # Dirichlet concentration of the label split
    ("max_examples", "int | None", field(default=4000)),           # random subset of `data` before sharding
    ("participation", float, field(default=1.0)),                  # fraction of devices sampled each round
    ("device_memory", tuple, field(default=())),                   # bytes each device says it has (cycled)
    ("split", tuple, field(default=(0.8, 0.1, 0.1))),
    ("seed", int, field(default=0)),
    ("eval_batch_size", int, field(default=64)),
    ("train", TrainConfig, field(default_factory=TrainConfig)),
    ("eval", EvalConfig, field(default_factory=EvalConfig)),        # the devices' evaluation of each global
    *[(name, cls, field(default_factory=cls)) for name, cls in config_sections().items()],
    ("robust", RobustConfig, field(default_factory=RobustConfig)),  # the server's defences, as in the spec
    ("dp", DPConfig, field(default_factory=DPConfig)),              # DP-FedAvg, as in the spec
    ("fedopt", FedOptConfig, field(default_factory=FedOptConfig)),  # the server optimizer, as in the spec
    ("compression", CompressionConfig, field(default_factory=CompressionConfig)),   # how updates travel, as in the spec
], bases=(_SimulationChecks,), frozen=True)
SimulationConfig.__module__ = __name__
SimulationConfig.__doc__ = "What ``edge-runtime simulate`` federates, and how (see the module docstring)."


@dataclass
class DeviceData:
    device_id: str
    splits: Splits
    personal: PersonalState | None = None   # what the method keeps on the device between rounds
    residual: dict | None = None            # the error feedback of its compressed uploads (``round.wire``)

    @property
    def train(self) -> LocalDataset:
        return self.splits.train

    @property
    def val(self) -> LocalDataset:
        return self.splits.val

    @property
    def test(self) -> LocalDataset:
        return self.splits.test


def prepare_devices(cfg: SimulationConfig) -> list[DeviceData]:
    """The simulated devices (``dev00``, ``dev01``, ... as the demo names its agents), each with its
    data split the way an agent splits it."""
    for k, files in {"test": cfg.device_test_data, "val": cfg.device_val_data}.items():
        if files and len(files) != len(cfg.device_data):
            raise ConfigError(f"device_{k}_data: {len(files)} file(s) for {len(cfg.device_data)} device_data "
                              f"file(s); give one per device, in the same order")
    if not cfg.device_data:
        if cfg.device_test_data or cfg.device_val_data:
            raise ConfigError("device_test_data / device_val_data go with device_data (one file per device)")
        shards = federation_shards(resolve_dataset(cfg.data), cfg.devices, cfg.alpha, cfg.max_examples, cfg.seed)
        return [DeviceData(f"dev{k:02d}", local_splits(d, cfg.split, cfg.seed, f"dev{k:02d}"))
                for k, d in enumerate(shards)]
    every = [*cfg.device_data, *cfg.device_test_data, *cfg.device_val_data]
    sets = [resolve_dataset(p) for p in every]
    if len({d.kind for d in sets}) != 1:
        raise ConfigError("device data files mix classification and generation rows")
    if sets[0].kind == "classification":  # one label space for the whole federation
        names = sorted({n for d in sets for n in d.label_names})
        sets = [resolve_dataset(p, names) for p in every]
    n, n_test = len(cfg.device_data), len(cfg.device_test_data)
    tests, vals = sets[n:n + n_test], sets[n + n_test:]
    return [DeviceData(f"dev{k:02d}", local_splits(ds, cfg.split, cfg.seed, f"dev{k:02d}",
                                                   test=tests[k] if tests else None, val=vals[k] if vals else None))
            for k, ds in enumerate(sets[:n])]


def simulation_spec(cfg: SimulationConfig, devices: list[DeviceData]) -> TrainingSpec:
    """The training spec a server would send for ``cfg`` (the label space is the devices' own)."""
    first = devices[0].train
    classification = first.kind == "classification"
    corpus = ()
    if resolve_model_source(cfg.model).is_tiny:   # tiny test models build their word tokenizer from the data
        corpus = tuple(t for d in devices for t in d.train.inputs + d.train.targets if isinstance(t, str))
    return TrainingSpec(model=cfg.model, task="classification" if classification else "causal-lm",
                        labels=tuple(first.label_names) if classification else (), method=cfg.method,
                        quantization=cfg.quantization, train=cfg.train, split=cfg.split, seed=cfg.seed,
                        tokenizer_corpus=corpus, robust=cfg.robust, dp=cfg.dp, compression=cfg.compression,
                        fedopt=cfg.fedopt, eval=cfg.eval,
                        **{k: getattr(cfg, k) for k in config_sections()})


# what lying devices send instead of their training reports: (round, reports, global) -> reports
Tamper = Callable[[int, "dict[str, DeviceReport]", "dict[str, torch.Tensor]"], "dict[str, DeviceReport]"]


class Federation:
    """The simulated devices and the server of one run: what the agents and the coordinator do with a
    round, called in turn (the devices share one model, loading the global before each turn)."""

    def __init__(self, cfg: SimulationConfig, devices: list[DeviceData], progress: bool = False,
                 tamper: Tamper | None = None) -> None:
        self.cfg, self.progress, self.tamper = cfg, progress, tamper
        self.devices = {d.device_id: d for d in devices}
        self.spec = simulation_spec(cfg, devices)
        self.method = METHODS[cfg.method]
        self.model, self.tokenizer = build_model(self.spec)
        self.global_state = self.method.initial_global(self.model, self.spec)   # prepares the shared model too
        self.init_state = self.global_state   # the round-0 global (FeDeRA's devices build their model from it)
        self.server_state: dict[str, torch.Tensor] = {}
        self.configurator_state: dict = {}   # the method's configurator (DropPEFT's bandit), JSON
        self.history: list[dict] = [initial_row()]
        self.rounds_done: dict[str, int] = {}
        self.selection: dict | None = None
        self.downlink_residual: dict | None = None   # the server's error feedback (compression.downlink)

    def participants(self, round_: int) -> list[str]:
        n = len(self.devices)
        per_round = 0 if self.cfg.participation >= 1 else max(1, round(self.cfg.participation * n))
        return select_participants(list(self.devices), round_, self.spec.seed, per_round, n, self.rounds_done)

    def device_turns(self, round_: int, action: str, participants: list[str] | None = None,
                     assignments: dict | None = None) -> dict[str, DeviceReport]:
        """Each participant's :func:`device_round` on the global as it would receive it."""
        blob, reports = encode_tensors(self.global_state), {}
        for d in participants if participants is not None else self.participants(round_):
            dev = self.devices[d]
            self.method.load_trainable_state(self.model, decode_tensors(blob))
            spec = with_assignment(self.spec, (assignments or {}).get(d))
            reports[d] = device_round(self.method, self.model, self.tokenizer, dev.splits, spec, action=action,
                                      round_=round_, device_id=d, personal=dev.personal,
                                      eval_batch_size=self.cfg.eval_batch_size, progress=self.progress)
            dev.personal = reports[d].personal
        return reports

    def score_round(self) -> None:
        """FedPepTAO's round 0: each device scores layers, the method picks the global's layout."""
        reports = self.device_turns(0, "score")
        accepted = {d: {"n_samples": r.n_samples, "metrics": finite_metrics(r.metrics)} for d, r in reports.items()}
        self.global_state, info = self.method.select(self.global_state, score_reports(accepted), self.spec)
        self.init_state = self.global_state
        self.selection = {**info, "devices": sorted(reports)}
        log.info("score round: shared layers %s", info.get("shared_layers"))

    def train_round(self, r: int) -> dict | None:
        """Round ``r``; returns the row of the global its devices evaluated (round ``r - 1``'s)."""
        participants, assignments, offered = self.participants(r), {}, {}
        if self.method.assignable:
            index = {d: k for k, d in enumerate(self.devices)}
            profiles = {d: _sim_profile(self.cfg, index[d]) for d in participants}
            assignments, offered = self.method.assign(self.configurator_state, profiles, self.spec, r)
        reports = self.device_turns(r, "train", participants, assignments)
        if self.tamper:   # lying devices (the defences' benchmark): what they send instead
            reports = self.tamper(r, dict(reports), self.global_state)
        blobs = {}
        for d, rep in reports.items():   # the bytes the agent would send (its residual kept as the agent keeps it)
            blobs[d], residual = encode_update(rep.upload, self.global_state, self.spec.compression,
                                               self.devices[d].residual)
            self.devices[d].residual = residual
        accepted = {d: {"n_samples": rep.n_samples, "metrics": finite_metrics(rep.metrics), "bytes": len(blobs[d]),
                        "raw_bytes": raw_bytes(rep.upload), "layer_steps": list(rep.layer_steps)}
                    for d, rep in reports.items()}
        evaluated = self.record(r - 1, accepted, reports)
        updates = [as_update(d, a, decode_update(blobs[d], self.global_state, self.spec.compression))
                   for d, a in sorted(accepted.items())]
        t0 = time.perf_counter()
        new_global, self.server_state, self.configurator_state, defence = aggregate_checked(
            self.method, self.global_state, updates, self.server_state, self.configurator_state, self.spec,
            len(self.devices), r)
        # the global devices will hold: the server's compressed downlink, as the coordinator sends it
        delta, self.global_state, self.downlink_residual = encode_global(new_global, self.global_state,
                                                                         self.spec.compression, self.downlink_residual)
        aggregate_s = time.perf_counter() - t0
        seconds = aggregate_s + sum(rep.timings.get("train_s", 0.0) for rep in reports.values())
        for d in accepted:
            self.rounds_done[d] = self.rounds_done.get(d, 0) + 1
        self.history.append(round_row(r, sorted(reports), accepted, len(encode_tensors(self.global_state)), seconds,
                                      configurator_row(self.method, offered, updates) if offered else None, defence,
                                      len(delta) if delta is not None else None))
        self.history[-1]["phases"] = round_phases(accepted, aggregate_s=aggregate_s)   # devices take turns: no idle
        note_privacy(self.history, self.spec)
        return evaluated

    def final_round(self) -> dict:
        """The devices of the round after the last evaluate the final global; returns its row."""
        reports = self.device_turns(self.cfg.rounds + 1, "evaluate")
        row = self.record(self.cfg.rounds, {d: {"n_samples": 0, "metrics": finite_metrics(rep.metrics), "bytes": 0}
                                            for d, rep in reports.items()}, reports)
        row["final"] = True
        return row

    def record(self, global_round: int, accepted: dict, reports: dict[str, DeviceReport]) -> dict:
        """The coordinator's :func:`record_eval`, plus what a simulation can see: each device's number."""
        row = record_eval(self.history, global_round, accepted)
        ids = list(self.devices)
        acc = {d: rep.metrics["eval_accuracy"] for d, rep in reports.items() if "eval_accuracy" in rep.metrics}
        row.update(global_accuracy=row["accuracy"], device_accuracy=[acc.get(d) for d in ids],
                   mean_device_accuracy=float(np.mean(list(acc.values()))) if acc else None)
        personal = {d: rep.metrics["personal_accuracy"] for d, rep in reports.items() if "personal_accuracy" in rep.metrics}
        if personal:
            row.update(mean_personal_accuracy=float(np.mean(list(personal.values()))),
                       device_personal_accuracy=[personal.get(d) for d in ids],
                       personalise_seconds=sum(rep.timings.get("personalise_s", 0.0) for rep in reports.values()))
            if all("fusion_a" in reports[d].metrics for d in personal):
                row["fusion"] = [(reports[d].metrics["fusion_a"], reports[d].metrics["fusion_b"]) if d in personal
                                 else None for d in ids]
        return row


def run_simulation(cfg: SimulationConfig, out_dir: Path | None, progress: bool = True,
                   on_round: Callable[[dict], None] | None = None, tamper: Tamper | None = None) -> dict:
    """Run ``cfg.rounds`` rounds; returns the history (also written to ``out_dir``). ``on_round`` gets
    each row as soon as its accuracy is known (row r once round r + 1's devices evaluated it).
    ``tamper(round, reports, global_state)`` returns the training reports as the server receives
    them: how a benchmark makes some devices lie (inflated counts, huge updates)."""
    t_start = time.perf_counter()
    devices = prepare_devices(cfg)
    fed = Federation(cfg, devices, progress, tamper)
    if fed.method.scoring:
        fed.score_round()
    update_bytes = len(encode_tensors(fed.global_state))
    n_params = sum(v.numel() for v in fed.global_state.values())
    log.info("model %s (%s), method %s: %d trainable params (%.2f MB per update); %d devices, train sizes %s",
             cfg.model, fed.spec.task, cfg.method, n_params, update_bytes / 1e6, len(devices),
             [len(d.train) for d in devices])
    for r in range(1, cfg.rounds + 1):
        row = fed.train_round(r)
        if on_round:
            on_round(row)
    row = fed.final_round()
    if on_round:
        on_round(row)
    classification = fed.spec.task == "classification"
    history = {
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "task": fed.spec.task,
        "label_names": list(fed.spec.labels),
        "devices": [{"id": d.device_id, "train": len(d.train), "val": len(d.val), "test": len(d.test)}
                    for d in devices],
        "label_histogram": (label_histogram([y for d in devices for y in d.train.targets], _shard_ranges(devices),
                                            len(fed.spec.labels)).tolist() if classification else None),
        "trainable_params": n_params,
        "update_bytes": update_bytes,
        "selection": fed.selection,
        "rounds": fed.history,
        "total_seconds": time.perf_counter() - t_start,
    }
    if out_dir is not None:
        history["adapter_dir"] = str(write_outputs(Path(out_dir), fed, history))
    return history


def write_outputs(out_dir: Path, fed: Federation, history: dict) -> Path:
    """What a fleet's server writes at the end of a run (the same writer), plus ``history.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_history(out_dir, history)
    state = {"run_id": "simulation", "fleet_name": "simulation", "training": fed.spec.to_json(),
             "history": fed.history, "rejects": [], "errors": [],
             "devices": {d["id"]: {"train": d["train"], "rounds_done": fed.rounds_done.get(d["id"], 0)}
                         for d in history["devices"]}}
    write_report(out_dir, state)
    return export_adapter(out_dir, state["training"], fed.global_state, fed.init_state, state)


def _sim_profile(cfg: SimulationConfig, k: int) -> dict:
    """What simulated device ``k`` would say in its hello about memory (``device_memory``, cycled)."""
    return {"memory_budget": cfg.device_memory[k % len(cfg.device_memory)]} if cfg.device_memory else {}


def _shard_ranges(devices: list[DeviceData]) -> list[list[int]]:
    out, start = [], 0
    for d in devices:
        out.append(list(range(start, start + len(d.train))))
        start += len(d.train)
    return out
