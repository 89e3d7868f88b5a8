"""Crash-safe writes: readers see the old or the new, and the new is on disk before it is swapped in."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from edge_runtime import atomic_io


@pytest.fixture
def disk_log(monkeypatch):
    """What reached the disk and when: every fsync (by path) and every rename, in order."""
    events = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a file descriptor")
    monkeypatch.setattr(atomic_io.os, "fsync", logged_fsync)
    monkeypatch.setattr(atomic_io.os, "replace", logged_replace)
    return events


def test_a_new_folder_is_on_disk_before_it_replaces_the_old_one(tmp_path, disk_log):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")

    def write(tmp: Path):
        (tmp / "weights.bin").write_bytes(b"w" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")

    atomic_io.replace_dir_atomic(final, write)
    assert sorted(p.name for p in final.rglob("*")) == ["config.json", "sub", "weights.bin"]
    swap = next(i for i, e in enumerate(disk_log) if e[0] == "replace" and e[2] == str(final))
    tmp = Path(disk_log[swap][1])
    synced_before = {Path(e[1]) for e in disk_log[:swap] if e[0] == "fsync"}
    assert {tmp / "weights.bin", tmp / "sub" / "config.json", tmp / "sub", tmp} <= synced_before
    assert ("fsync", str(tmp_path)) in disk_log[swap:]   # and the swap itself, after it


def test_a_folder_write_that_fails_leaves_the_old_folder_and_no_temp(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")

    def write(tmp: Path):
        (tmp / "half.bin").write_bytes(b"h")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_io.replace_dir_atomic(final, write)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert (final / "old.bin").read_bytes() == b"old"


def test_a_file_is_on_disk_before_its_rename(tmp_path, disk_log):
    path = atomic_io.write_json_atomic(tmp_path / "state.json", {"round": 3})
    assert path.read_text().strip().endswith("}")
    rename = next(i for i, e in enumerate(disk_log) if e[0] == "replace")
    assert disk_log[rename - 1][0] == "fsync" and Path(disk_log[rename - 1][1]).name.startswith(".state.json.")
    assert disk_log[rename + 1] == ("fsync", str(tmp_path))


@pytest.mark.parametrize("code, raised", [(errno.EINVAL, False), (errno.EIO, True)])
def test_a_file_system_that_cannot_fsync_a_folder_still_writes_but_a_disk_error_is_raised(tmp_path, monkeypatch,
                                                                                          code, raised):
    fsync = os.fsync

    def folder_fsync_fails(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        fsync(fd)

    monkeypatch.setattr(atomic_io.os, "fsync", folder_fsync_fails)
    final = tmp_path / "adapter"
    if raised:
        with pytest.raises(OSError, match=os.strerror(errno.EIO)):
            atomic_io.replace_dir_atomic(final, lambda tmp: (tmp / "w.bin").write_bytes(b"w"))
        assert list(tmp_path.iterdir()) == []   # nothing swapped in, no temporary left
    else:   # a mount without folder fsync (EINVAL): the write stands, as durable as that mount makes it
        atomic_io.replace_dir_atomic(final, lambda tmp: (tmp / "w.bin").write_bytes(b"w"))
        atomic_io.write_json_atomic(tmp_path / "state.json", {"round": 1})
        assert (final / "w.bin").read_bytes() == b"w" and (tmp_path / "state.json").is_file()
