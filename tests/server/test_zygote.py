"""The zygote that forks the demo's server and agents: each child is the process its command line makes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from broker_server import demo
from broker_server.zygote import Zygote

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote forks only on Linux")

CHILD = textwrap.dedent("""
    import json, os, sys, time
    out, mode = sys.argv[1], sys.argv[2]
    json.dump({"preloaded": sorted(m for m in ("torch", "peft", "edge_runtime.agent", "edge_runtime.cli")
                                   if m in sys.modules),
               "argv": sys.argv[1:], "name": __name__, "omp": os.environ.get("OMP_NUM_THREADS"),
               "ppid": os.getppid()}, open(out, "w"))
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if mode == "sleep":
        time.sleep(120)
    if mode == "raise":
        raise ValueError("boom in the child")
    sys.exit(int(mode))
""")


@pytest.fixture(scope="module")
def child_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zygote_child")
    (d / "zchild.py").write_text(CHILD)
    return d


def _env(child_dir: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(child_dir), os.getcwd()]), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def zygote(child_dir):
    """One zygote with the demo's full preload, shared by the tests that only ask it for children."""
    z = Zygote(_env(child_dir), child_dir / "zygote.log")
    assert z.ready, z.why
    yield z
    z.close()
    z.proc.wait(30)


def test_a_child_runs_its_module_as_main_with_the_libraries_already_imported(zygote, child_dir, tmp_path):
    t0 = time.perf_counter()
    child = zygote.spawn("zchild", [str(tmp_path / "a.json"), "3"], tmp_path / "a.log")
    assert child.wait(30) == 3                 # sys.exit(3) is the exit code
    started_s = time.perf_counter() - t0
    seen = json.loads((tmp_path / "a.json").read_text())
    assert seen["name"] == "__main__" and seen["argv"] == [str(tmp_path / "a.json"), "3"]
    # imported by the zygote, not again; the command's own module is left for the child to run as __main__
    assert seen["preloaded"] == ["edge_runtime.agent", "peft", "torch"]
    assert seen["omp"] == "1" and seen["ppid"] == zygote.proc.pid      # the zygote's environment and child
    assert (tmp_path / "a.log").read_text().splitlines() == ["to stdout", "to stderr"]
    assert started_s < 5.0, started_s   # importing peft alone takes longer than that here


def test_an_uncaught_exception_exits_1_with_its_traceback_in_the_log(zygote, tmp_path):
    child = zygote.spawn("zchild", [str(tmp_path / "b.json"), "raise"], tmp_path / "b.log")
    assert child.wait(30) == 1
    log = (tmp_path / "b.log").read_text()
    assert "Traceback" in log and "ValueError: boom in the child" in log


def test_terminate_and_kill_reach_the_child(zygote, tmp_path):
    a = zygote.spawn("zchild", [str(tmp_path / "a.json"), "sleep"], tmp_path / "a.log")
    b = zygote.spawn("zchild", [str(tmp_path / "b.json"), "sleep"], tmp_path / "b.log")
    assert a.poll() is None and b.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        a.wait(0.5)
    a.terminate()
    b.kill()
    assert a.wait(30) == -signal.SIGTERM
    assert b.wait(30) == -signal.SIGKILL
    a.terminate()   # a second signal to an ended child is no error
    assert a.poll() == -signal.SIGTERM


@pytest.mark.parametrize("how", ["stdin closed", "SIGTERM"])
def test_a_stopping_zygote_stops_its_children_and_reports_their_exits(child_dir, tmp_path, how):
    z = Zygote(_env(child_dir), tmp_path / "zygote.log", modules=("json",))   # fast: nothing heavy to import
    assert z.ready, z.why
    kids = [z.spawn("zchild", [str(tmp_path / f"{k}.json"), "sleep"], tmp_path / f"{k}.log") for k in range(2)]
    for k in range(2):
        _wait_for(tmp_path / f"{k}.json")
    z.close() if how == "stdin closed" else z.proc.terminate()
    assert z.proc.wait(30) == 0
    assert [kid.wait(10) for kid in kids] == [-signal.SIGTERM, -signal.SIGTERM]


def test_a_zygote_that_cannot_import_the_libraries_is_not_ready_and_the_demo_spawns(child_dir, tmp_path,
                                                                                      monkeypatch):
    (child_dir / "broken").mkdir(exist_ok=True)
    (child_dir / "broken" / "peft.py").write_text("raise ImportError('this peft is broken')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(child_dir / "broken"), os.getcwd()]))
    said = []
    start = demo._starter(demo.DemoConfig(out=tmp_path, launch="fork"), procs := [], said.append)
    assert start is demo._spawn and procs == []
    assert len(said) == 1 and "this peft is broken" in said[0]
    assert demo._starter(demo.DemoConfig(out=tmp_path, launch="spawn"), [], said.append) is demo._spawn
    assert len(said) == 1   # asked for plain processes: no zygote, nothing to say


def test_bad_requests_get_an_error_not_a_dead_zygote(zygote, tmp_path):
    zygote.proc.stdin.write(b"not json\n" + json.dumps({"id": 10**6}).encode() + b"\n")
    zygote.proc.stdin.flush()
    child = zygote.spawn("zchild", [str(tmp_path / "c.json"), "0"], tmp_path / "c.log")
    assert child.wait(30) == 0


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)
