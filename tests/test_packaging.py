"""What a fresh install gets: the shipped profiles (from the installed package), the licence, every
subpackage, and missing-module messages that name the pip command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from edge_runtime.deps import MissingDependency, install_hint, require

ROOT = Path(__file__).resolve().parents[1]
EXPECT_WHEEL = os.environ.get("EDGE_RUNTIME_EXPECT_WHEEL") == "1"   # .ci/run installs the wheel, not this checkout


def _run_outside_the_tree(script: str, cwd) -> dict:
    """``script``'s JSON output, run by this interpreter from ``cwd`` with no source folder on sys.path
    (-P: not the current folder; no PYTHONPATH): what an installed package sees."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-P", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_profiles_are_found_from_the_installed_package_outside_the_source_tree(tmp_path):
    script = ("import json, edge_runtime, edge_runtime.device.profiles as p; print(json.dumps({"
              "'package': edge_runtime.__file__, 'dir': str(p.PROFILES_DIR), 'training': sorted(p.training_profiles()),"
              "'devices': sorted(p.device_classes()), 'plan': p.find_training_profile('lora-minilm').name}))")
    got = _run_outside_the_tree(script, tmp_path)
    assert got["training"] == sorted(p.stem for p in (ROOT / "profiles" / "training").glob("*.yaml"))
    assert got["devices"] == sorted(p.stem for p in (ROOT / "profiles" / "devices").glob("*.yaml"))
    assert got["plan"] == "lora-minilm"
    if EXPECT_WHEEL:
        assert not got["package"].startswith(str(ROOT) + os.sep), got
        assert not got["dir"].startswith(str(ROOT) + os.sep), got
        assert "site-packages" in got["dir"]


def test_installed_distribution_carries_profiles_and_licence(tmp_path):
    # asked from outside the source tree: a build there leaves an edge_runtime.egg-info that would answer instead
    script = ("import json, importlib.metadata as md; d = md.distribution('edge-runtime'); print(json.dumps("
              "{'license': d.metadata['License-Expression'], 'files': [str(f) for f in d.files or []]}))")
    got = _run_outside_the_tree(script, tmp_path)
    assert got["license"] == "Apache-2.0"
    if not EXPECT_WHEEL:
        pytest.skip("an editable install lists no package files; .ci/run checks the wheel install")
    files = set(got["files"])
    assert "edge_runtime/profiles/training/lora-minilm.yaml" in files
    assert "edge_runtime/profiles/devices/jetson-orin-nano-8gb.yaml" in files
    assert any(f.endswith("licenses/LICENSE") for f in files)


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("edge_runtime/**/__init__.py")}
    found |= {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("broker_server/**/__init__.py")}
    found = {f for f in found if "__pycache__" not in f}
    assert found | {"edge_runtime.profiles"} == listed


@pytest.mark.integration
def test_the_wheel_holds_profiles_licence_and_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel, = tmp_path.glob("edge_runtime-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in (ROOT / "profiles").rglob("*.yaml"):
        assert f"edge_runtime/profiles/{rel.relative_to(ROOT / 'profiles').as_posix()}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "edge_runtime/data/wordnet_noun_supersenses.jsonl.gz" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for dep in ("amqtt", "onnx", "onnxscript", "onnxruntime", "paho-mqtt", "peft", "transformers"):
        assert f"Requires-Dist: {dep}" in meta, dep
    assert "Requires-Dist: bitsandbytes" in meta and "extra == \"quant\"" in meta


# -- missing modules name the pip command --------------------------------------------------------
def test_install_hints_name_the_extra():
    assert install_hint("bitsandbytes") == "pip install 'edge-runtime[quant]'"
    assert install_hint("gguf") == "pip install 'edge-runtime[models]'"
    assert install_hint("onnxscript").startswith("pip install onnxscript")


def test_require_names_the_missing_package_and_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # import bitsandbytes now raises ModuleNotFoundError
    with pytest.raises(MissingDependency, match=r"NF4 needs the Python package 'bitsandbytes'.*edge-runtime\[quant\]"):
        require("bitsandbytes", "NF4")


def test_quantization_without_bitsandbytes_says_which_extra(monkeypatch):
    from edge_runtime.training.models import bitsandbytes_problem

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert "pip install 'edge-runtime[quant]'" in bitsandbytes_problem()


def test_onnx_export_without_onnxscript_says_what_to_install(monkeypatch, tmp_path):
    from edge_runtime.export.onnx import _export

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(MissingDependency, match="ONNX export needs the Python package 'onnxscript'"):
        _export(None, None, tmp_path / "m.onnx", optimize=False)


def test_embedded_broker_without_amqtt_says_what_to_install(monkeypatch):
    from broker_server.demo import DemoConfig, validate

    monkeypatch.setitem(sys.modules, "amqtt", None)
    monkeypatch.setitem(sys.modules, "amqtt.broker", None)
    with pytest.raises(MissingDependency, match="the embedded MQTT broker needs the Python package 'amqtt'"):
        validate(DemoConfig(max_examples=300, devices=2))
