"""A build lock left by a killed process is removed; a lock a live process holds is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from slm_cli.engine.ops import clear_stale_locks

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
