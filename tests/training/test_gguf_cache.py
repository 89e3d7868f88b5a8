"""A GGUF base converted once: the copy loads what the GGUF loads, bit for bit, and a bad copy is not trusted."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from edge_runtime.training import gguf_cache
from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source

TEXTS = ["a smut fungus of the genus Ustilago", "the capital of France is", "x"]


def _load(task="classification"):
    src = resolve_model_source("smollm2-135m")
    tok = load_tokenizer(src)
    model = load_model(src, task, num_labels=5, tokenizer=tok, seed=3)
    return tok, {k: v.clone() for k, v in model.state_dict().items()}


def _copies(root):
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []   # no temp, lock


@pytest.mark.integration
def test_the_converted_copy_loads_the_same_weights_head_and_tokens_and_is_made_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(gguf_cache.ENV, "off")
    tok_ref, ref = _load()
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="edge_runtime.training.gguf_cache"):
        _load()                         # converts
        made = _copies(tmp_path / "cache")
        mtime = (made[0] / "model.safetensors").stat().st_mtime_ns
        tok, got = _load()              # reads the copy
    assert len(made) == 1 and (made[0] / gguf_cache.MARKER).is_file()
    assert sum("converting" in r.message for r in caplog.records) == 1
    assert (made[0] / "model.safetensors").stat().st_mtime_ns == mtime
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)   # the seeded head too
    assert tok(TEXTS).input_ids == tok_ref(TEXTS).input_ids
    assert (tok.pad_token, tok.padding_side) == (tok_ref.pad_token, tok_ref.padding_side)

    # a damaged copy: the GGUF is read instead (the same weights), and the copy is removed
    (made[0] / "model.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="edge_runtime.training.gguf_cache"):
        src = resolve_model_source("smollm2-135m")
        model = load_model(src, "classification", num_labels=5, tokenizer=tok, seed=3)
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    assert not made[0].exists() and any("removing the converted copy" in r.message for r in caplog.records)


@pytest.mark.integration
def test_no_copy_when_the_disk_cannot_hold_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_cache, "FREE_MARGIN", 1 << 60)
    src = resolve_model_source("smollm2-135m")
    with caplog.at_level(logging.WARNING, logger="edge_runtime.training.gguf_cache"):
        assert gguf_cache.converted(src.path / src.gguf_file) is None
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []   # no temp left
    assert any("not keeping a converted copy" in r.message for r in caplog.records)


@pytest.mark.parametrize("value", ["off", "OFF", "none", "0"])
def test_the_cache_can_be_turned_off(monkeypatch, value):
    monkeypatch.setenv(gguf_cache.ENV, value)
    assert gguf_cache.cache_root() is None


def test_the_cache_folder_follows_xdg_and_the_copy_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(gguf_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "edge-runtime" / "models"
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(16))
    first = gguf_cache.copy_folder(f, tmp_path)
    assert first == gguf_cache.copy_folder(f, tmp_path) and first.name.startswith("m-")
    os.utime(f, ns=(1, 1))                      # a replaced file: another copy
    assert gguf_cache.copy_folder(f, tmp_path) != first


def test_two_converters_leave_one_copy(tmp_path):
    def finished(name):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / gguf_cache.MARKER).write_text(name)
        return d

    folder = tmp_path / "copy"
    assert gguf_cache.install(finished("a"), folder) == folder
    assert gguf_cache.install(finished("b"), folder) == folder     # the second keeps the first's
    assert (folder / gguf_cache.MARKER).read_text() == "a"
    (folder / gguf_cache.MARKER).unlink()                          # a folder there that is not a copy
    with pytest.raises(OSError):
        gguf_cache.install(finished("c"), folder)


def test_the_gguf_config_is_read_once_a_process_and_from_the_copy_when_there_is_one(tmp_path, monkeypatch):
    import transformers
    from transformers import LlamaConfig

    from edge_runtime.device import memory_model

    calls = []

    def from_pretrained(path, gguf_file=None, **kw):
        calls.append((Path(path), gguf_file))
        return LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path))
    memory_model._arch_of.cache_clear()
    src = resolve_model_source("smollm2-135m")
    assert memory_model.load_arch("smollm2-135m").layers == 3
    assert memory_model.load_arch("smollm2-135m").layers == 3          # asked every round: read once
    assert calls == [(src.path, src.gguf_file)]
    copy = gguf_cache.copy_folder(src.path / src.gguf_file, tmp_path)   # a converted copy appears
    copy.mkdir()
    (copy / "config.json").write_text("{}")
    (copy / gguf_cache.MARKER).write_text("{}")
    memory_model._arch_of.cache_clear()
    memory_model.load_arch("smollm2-135m")
    assert calls[-1] == (copy, None)
    memory_model._arch_of.cache_clear()


def test_processes_that_start_together_convert_one_at_a_time(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    running, ran = [], []

    def convert(g, folder, tmp):   # the slow part, faked: who runs it, and whether two overlap
        running.append(1)
        overlap = len(running) > 1
        time.sleep(0.3)
        (tmp / "config.json").write_text("{}")
        (tmp / gguf_cache.MARKER).write_text("{}")
        ran.append(overlap)
        running.pop()
        return gguf_cache.install(tmp, folder)

    monkeypatch.setattr(gguf_cache, "_convert", convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(gguf_cache.converted(gguf))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert ran == [False]                                  # converted once, by one of the three
    assert len(got) == 3 and len(set(got)) == 1 and gguf_cache.complete(got[0])
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [got[0].name]


def test_a_conversion_that_fails_in_any_way_leaves_the_gguf_to_be_read(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))

    def convert(g, folder, tmp):
        raise KeyError("a tensor transformers did not expect")

    monkeypatch.setattr(gguf_cache, "_convert", convert)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.training.gguf_cache"):
        assert gguf_cache.converted(gguf) is None
    assert "KeyError" in caplog.text
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []   # no temp left


def test_a_process_that_waits_too_long_for_anothers_conversion_reads_the_gguf(tmp_path, monkeypatch, caplog):
    import fcntl

    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_cache, "LOCK_WAIT_S", 0.5)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    monkeypatch.setattr(gguf_cache, "_convert", lambda *a: pytest.fail("converted while another held the lock"))
    folder = gguf_cache.copy_folder(gguf, tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    with open(tmp_path / "cache" / f".{folder.name}.lock", "a+b") as hung:   # a converter that hangs
        fcntl.flock(hung, fcntl.LOCK_EX)
        t = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="edge_runtime.training.gguf_cache"):
            assert gguf_cache.converted(gguf) is None
        assert 0.5 <= time.monotonic() - t < 5   # it waited its turn, then gave up
    assert "another process has been converting it" in caplog.text
    assert _copies(tmp_path / "cache") == []
