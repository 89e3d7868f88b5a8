"""The package structure holds: broker_server imports edge_runtime, never the reverse; no import cycles."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _code_shape():
    spec = importlib.util.spec_from_file_location("code_shape", ROOT / "scripts" / "code_shape.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_edge_runtime_never_imports_broker_server_and_nothing_imports_in_a_cycle():
    shape = _code_shape()
    graph, _ = shape.imports(shape.modules())
    upward = sorted((a, b) for a, bs in graph.items() for b in bs
                    if a.startswith("edge_runtime") and b.startswith("broker_server"))
    assert upward == [], upward
    assert shape.cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():   # the check above can fail
    shape = _code_shape()
    assert shape.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
