"""Left-overs of dead processes are removed, what a live process uses is kept: build locks, shm buffers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from slm_cli.engine.ops import SHM_PREFIX, clear_shm_buffers, clear_stale_locks

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="holders are read from /proc (Linux)")


def test_an_orphaned_lock_is_removed_and_a_held_one_kept(tmp_path):
    orphan = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    held = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (orphan, held):
        lock.parent.mkdir(parents=True)
    # The way torch's FileBaton takes the lock: O_CREAT | O_EXCL, fd kept open while held.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print(1, flush=True); time.sleep(60)", str(held)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "1"
        # An owner that died holding the lock: the file exists, nobody has it open.
        os.close(os.open(orphan, os.O_CREAT | os.O_EXCL))
        removed = clear_stale_locks(tmp_path, settle=0.05)
        assert removed == [orphan]
        assert not orphan.exists() and held.exists()
    finally:
        holder.kill()
        holder.wait()
    # Once its holder is gone, the other lock is stale too.
    assert clear_stale_locks(tmp_path, settle=0.05) == [held]


def test_no_locks_no_wait(tmp_path):
    t0 = time.perf_counter()
    assert clear_stale_locks(tmp_path, settle=5.0) == []
    assert time.perf_counter() - t0 < 2.0


def _buffer(root, port: int, rank: int, age_s: float = 3600.0):
    path = root / f"{SHM_PREFIX}0_127.0.0.1_{port}_{rank}"
    path.write_bytes(b"\0" * 4096)
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def test_shm_buffers_of_finished_runs_are_removed_and_mapped_or_young_ones_kept(tmp_path):
    finished = [_buffer(tmp_path, 40001, rank) for rank in (0, 1)]
    mapped = _buffer(tmp_path, 40002, 0)
    young = _buffer(tmp_path, 40003, 0, age_s=0.0)
    other = tmp_path / "not_deepspeed"
    other.write_bytes(b"x")
    # A live rank maps its buffer the way DeepSpeed's shm.cpp does (open, mmap, close the fd).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import mmap, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "m = mmap.mmap(fd, 4096); os.close(fd); print(1, flush=True); time.sleep(60)", str(mapped)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "1"
        assert sorted(clear_shm_buffers(root=tmp_path)) == finished
        assert mapped.exists() and young.exists() and other.exists()
    finally:
        holder.kill()
        holder.wait()
    # One run's buffers by its port, whatever their age, once its processes are gone.
    assert clear_shm_buffers(port=40003, min_age=0.0, root=tmp_path) == [young]
    assert clear_shm_buffers(root=tmp_path) == [mapped]
    assert other.exists()
