"""Crash-safe file writes: write to a temporary file in the same folder, fsync, then rename."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # make the rename itself durable
    return path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of ``folder`` (a rename into it) durable. A file system that cannot fsync a
    folder (some network and FUSE mounts answer EINVAL) leaves the rename as durable as it makes it;
    any other failure (EIO) is raised."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(dir_fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Put every file under ``folder`` on disk, and its sub-folders' entries: what must be durable
    before ``folder`` is renamed into place (else a power cut after the rename can leave empty files)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):   # files before their folders
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as pretty-printed JSON."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def replace_dir_atomic(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have ``write(tmp_dir)`` fill a fresh folder, then swap it in for ``final``.

    A crash leaves either the previous folder or the new one at ``final`` (plus, at worst, a
    stray ``.tmp`` / ``.old`` sibling), never a half-written one: the new folder's files are on
    disk before the swap.
    """
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        write(tmp)
        fsync_tree(tmp)
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(final.parent)   # the swap itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
