"""A GGUF base converted once: its fp32 weights and tokenizer kept as a Hugging Face folder.

transformers de-quantises a GGUF file tensor by tensor and rebuilds its tokenizer every time it
loads one: for SmolLM2-135M that is 12.5 s for the model and 3.5 s for the tokenizer on one core
here, paid by every process at every start (an agent restarted by its service, the server, each
export). The converted folder loads in about a second. It is written once per GGUF file (keyed by
its path, size and modification time and by the transformers version that converted it) into a
temporary folder renamed into place, so a process that reads it never sees half of it; processes
that start together take turns on a lock file (one converts, the others read its copy; one that
waits more than ``LOCK_WAIT_S`` reads the GGUF), and where
there is no lock, two that convert at once leave one copy. A copy that fails to load is removed and
the GGUF is read again; a conversion that fails in any way leaves the GGUF to be read.

Where: ``$EDGE_RUNTIME_MODEL_CACHE`` (``off`` turns the cache off), else
``$XDG_CACHE_HOME/edge-runtime/models``, else ``~/.cache/edge-runtime/models``. Not written when the
folder cannot be made or the disk has less than the copy's size plus ``FREE_MARGIN`` free (the
model is then read from the GGUF each time, as before). The weights take 4 bytes per parameter
(SmolLM2-135M: 540 MB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from edge_runtime.atomic_io import fsync_dir, fsync_tree

log = logging.getLogger(__name__)

ENV = "EDGE_RUNTIME_MODEL_CACHE"
FORMAT = 1                    # bump when what a copy holds changes
FREE_MARGIN = 512 * 2**20     # what the copy must leave free on its disk
MARKER = "converted_from.json"
LOCK_WAIT_S = 600.0           # the longest a process waits for another's conversion (SmolLM2: ~18 s here)


def cache_root() -> Path | None:
    """The cache folder, or None when ``$EDGE_RUNTIME_MODEL_CACHE`` turns it off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "none", "0", "false"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-runtime" / "models"


def copy_folder(gguf: Path, root: Path) -> Path:
    """Where the converted copy of ``gguf`` lives (it may not exist yet)."""
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{FORMAT}"
    return root / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def converted(gguf: Path) -> Path | None:
    """The converted folder of ``gguf``, converting it now if it is not there yet; None when the cache is
    off or cannot hold it (the caller reads the GGUF). Processes that start together (the server and
    the agents of one machine) convert one at a time: the first converts, the others find its copy."""
    root = cache_root()
    if root is None:
        return None
    folder = copy_folder(gguf, root)
    if complete(folder):
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{folder.name}.lock", "a+b")
    except OSError as exc:
        log.warning("no converted copy of %s (reading the GGUF each time): %s", gguf.name, exc)
        return None
    with lock:
        if not _take_turn(lock):
            if complete(folder):
                return folder
            log.warning("no converted copy of %s (reading the GGUF): another process has been converting it "
                        "for over %.0f s", gguf.name, LOCK_WAIT_S)
            return None
        if complete(folder):
            return folder
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
            return _convert(gguf, folder, tmp)
        except Exception as exc:   # disk full, a failed save, anything: the GGUF still loads, as before
            log.warning("could not keep a converted copy of %s (reading the GGUF each time): %s: %s", gguf.name,
                        type(exc).__name__, exc)
            return None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _take_turn(lock) -> bool:
    """Hold ``lock`` (released when the file is closed); False when another process has held it for
    ``LOCK_WAIT_S`` (a conversion that hangs must not hold up every process on the machine). Where
    there is no flock (not POSIX, some network disks) there is no turn to wait for: convert, then
    rename, and a second copy loses the rename."""
    try:
        import fcntl
    except ImportError:
        return True
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        except OSError:
            return True


def _convert(gguf: Path, folder: Path, tmp: Path) -> Path | None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from edge_runtime.training.seeding import seeded

    log.info("converting %s to a model folder, once (%s)", gguf.name, folder)
    hf_logging.disable_progress_bar()
    try:
        with seeded(0):   # the process's generator is left as it was
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    finally:
        hf_logging.enable_progress_bar()
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    free = shutil.disk_usage(tmp).free
    if free < size + FREE_MARGIN:
        log.warning("not keeping a converted copy of %s: it needs %.0f MB and the disk has %.0f MB free",
                    gguf.name, size / 1e6, free / 1e6)
        return None
    tok.save_pretrained(tmp)
    # transformers will not save a model it read from GGUF (its quantizer says so), though the weights
    # are plain fp32 by now: the config without the GGUF marks, and the tensors (a tied copy once)
    model.config.quantization_config = None
    del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    save_file(_untied(model.state_dict()), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del model
    (tmp / MARKER).write_text(json.dumps({"gguf": str(gguf.resolve()), "bytes": gguf.stat().st_size}))
    return install(tmp, folder)


def _untied(state: dict) -> dict:
    """Each tensor once, under the base model's name: a head tied to the embedding is left out (a
    classifier loaded from the copy has no head to find the embedding under)."""
    kept, seen = {}, set()
    for name in sorted(state, key=lambda n: n.startswith("lm_head")):
        if state[name].data_ptr() not in seen:
            seen.add(state[name].data_ptr())
            kept[name] = state[name].contiguous()
    return kept


def install(tmp: Path, folder: Path) -> Path:
    """Rename the finished copy ``tmp`` into place, its files on disk first (a device may lose power
    right after); when another process got there first, keep theirs."""
    fsync_tree(tmp)
    try:
        tmp.rename(folder)
    except OSError:
        if not complete(folder):
            raise
        return folder
    fsync_dir(folder.parent)   # the rename itself
    return folder


def forget(folder: Path, why: str) -> None:
    """Remove a converted copy that failed to load (the next load converts again)."""
    log.warning("removing the converted copy %s (%s); reading the GGUF", folder, why)
    shutil.rmtree(folder, ignore_errors=True)
