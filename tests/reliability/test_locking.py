"""Locking for a stage that does not train (the teacher's lock is tested in tests/stages/test_teacher.py):
a live owner's lock refuses a second run, a dead owner's lock is taken over."""

import platform
import subprocess
import sys

import pytest

from tests.reliability.common import slm_json

pytestmark = pytest.mark.reliability


def test_quantize_respects_a_live_lock_and_takes_over_a_stale_one(slm, tmp_path, capsys, folders, record_message):
    out, lock = tmp_path / "fp8", tmp_path / "fp8.lock"
    args = ["quantize", f"model_path={folders['teacher']}", "eval.source=null", f"output_dir={out}"]
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{platform.node()} {owner.pid}")
        assert slm(*args) == 2
        err = " ".join(record_message(capsys.readouterr().err).split())
        assert f"another slm run ({platform.node()} pid {owner.pid}) is writing output_dir {out}" in err
        assert "delete the lock file only if that run is gone" in err
        assert not out.exists() and lock.read_text() == f"{platform.node()} {owner.pid}"  # not ours to remove
    finally:
        owner.kill()
        owner.wait()
    assert slm(*args) == 0  # the owner is gone: its lock is stale
    assert slm_json(out)["stage"] == "quantize" and not lock.exists()
