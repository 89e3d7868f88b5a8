"""Shared fixtures: a learnable toy task written as real JSONL files, tiny models."""

from __future__ import annotations

import json
import logging
import random
import subprocess
from pathlib import Path

import pytest


def pytest_configure(config):
    """GGUF bases converted once per test session into its own folder (gguf_cache), not into the
    machine's ~/.cache: every session starts cold, and nothing is left behind."""
    import os
    import tempfile

    if "EDGE_RUNTIME_MODEL_CACHE" not in os.environ:
        config._model_cache = tempfile.mkdtemp(prefix="edge-runtime-models-")
        os.environ["EDGE_RUNTIME_MODEL_CACHE"] = config._model_cache


def pytest_unconfigure(config):
    import shutil

    if getattr(config, "_model_cache", None):
        shutil.rmtree(config._model_cache, ignore_errors=True)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """A CLI ``main()`` called in-process points the root logger at that test's captured stderr;
    put the handlers back so later tests' threads never log into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)

TOY_WORDS = {
    "animal": ["dog", "cat", "horse", "cow", "bird", "goat"],
    "food": ["bread", "cheese", "apple", "rice", "soup", "honey"],
    "tool": ["hammer", "saw", "drill", "wrench", "knife", "chisel"],
}
FILLER = "the a of and with some very big small old new red".split()


def make_toy_rows(n: int, seed: int = 0) -> list[dict]:
    """Texts of filler words plus one keyword whose class is the label: learnable, not trivial."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(TOY_WORDS))
        toks = rng.sample(FILLER, 4) + [rng.choice(TOY_WORDS[label])]
        rng.shuffle(toks)
        rows.append({"text": " ".join(toks), "label": label})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def toy_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "toy.jsonl", make_toy_rows(600))


@pytest.fixture
def toy_generation_jsonl(tmp_path: Path) -> Path:
    rng = random.Random(1)
    rows = []
    for _ in range(120):
        word = rng.choice([w for ws in TOY_WORDS.values() for w in ws])
        kind = next(k for k, ws in TOY_WORDS.items() if word in ws)
        rows.append({"prompt": f"what is a {word} ?", "response": f"a {word} is a {kind}"})
    return write_jsonl(tmp_path / "gen.jsonl", rows)


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MB tmpfs for the disk-full tests (needs root: skipped where ``mount`` is refused)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}): run as root for the disk-full tests")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(mnt: Path) -> Path:
    """Write zeros to ``mnt/filler`` until the file system is full; returns the file (unlink to free it)."""
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:   # ENOSPC: full, which is the point
            pass
    return filler
