"""``broker-server``: the aggregation server's command line."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from edge_runtime import __version__
from edge_runtime.errors import EdgeRuntimeError

ADAPTER_FILE = "adapter_model.safetensors"


def _parse_input(spec: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:WEIGHT`` (weight = e.g. the device's number of training examples)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and weight.replace(".", "", 1).isdigit():
        return Path(path), float(weight)
    return Path(spec), 1.0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    from edge_runtime.algorithms.aggregation import weighted_mean
    from edge_runtime.atomic_io import write_bytes_atomic

    updates, config_dir = [], None
    for spec in args.inputs:
        path, weight = _parse_input(spec)
        file = path / ADAPTER_FILE if path.is_dir() else path
        if path.is_dir() and config_dir is None:
            config_dir = path
        try:
            updates.append((load_file(file), weight))
        except (OSError, SafetensorError) as exc:
            raise EdgeRuntimeError(f"{file}: cannot read as safetensors: {exc}") from exc
    merged = weighted_mean(updates)
    out = args.out
    blob = save({k: v.contiguous() for k, v in merged.items()})
    if config_dir is not None:  # inputs were peft adapter folders: write one too
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config_dir / "adapter_config.json", out / "adapter_config.json")
        write_bytes_atomic(out / ADAPTER_FILE, blob)
    else:
        write_bytes_atomic(out, blob)
    total = sum(w for _, w in updates)
    print(f"averaged {len(updates)} adapters ({len(merged)} tensors, weights "
          f"{[round(w / total, 4) for _, w in updates]}) into {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker-server", description="Aggregation server for edge-runtime fleets.")
    parser.add_argument("--version", action="version", version=f"broker-server {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("aggregate", help="weighted FedAvg of adapter files or peft adapter folders, offline",
                       description="Average adapters (safetensors files or peft adapter folders) with weights, "
                                   "e.g. broker-server aggregate --out global dev0_adapter:1200 dev1_adapter:300")
    p.add_argument("inputs", nargs="+", metavar="PATH[:WEIGHT]")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_aggregate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeRuntimeError as exc:
        print(f"broker-server: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
