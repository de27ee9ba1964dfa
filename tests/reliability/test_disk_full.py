"""A full disk while saving: simulated with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so
writes past it fail with EFBIG exactly as they would with ENOSPC. The previous artifact at
output_dir stays intact and the error says what happened and what to do."""

import resource
import shutil
import signal
import subprocess
import sys

import pytest

from tests.reliability.common import TEACHER, cli, cli_env, max_weight_diff, slm_json

pytestmark = pytest.mark.reliability

# Larger than the tokenizer, data cache and metrics files a tiny run writes; smaller than its
# 0.4 MB model.safetensors and its DeepSpeed checkpoint.
LIMIT_BYTES = 200_000


@pytest.fixture(autouse=True, scope="module")
def ops_built():
    """Build (or find) DeepSpeed's ops before any limit is set: a build under the file-size limit below
    would fail inside the compiler and test nothing of slm."""
    subprocess.run([sys.executable, "-m", "slm_cli.engine.ops"], env=cli_env(), check=True, capture_output=True, timeout=900)


def small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))


def test_disk_full_while_saving_keeps_the_previous_artifact(tmp_path, teacher_artifact, record_message):
    out = tmp_path / "artifact"
    shutil.copytree(teacher_artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = cli(["teacher", *TEACHER, "train.max_steps=2", f"output_dir={out}", "overwrite=true",
                f"hydra.run.dir={tmp_path}/logs"], cwd=tmp_path, preexec_fn=small_file_limit)
    err = " ".join(record_message(proc.stderr).split())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in err
    assert f"slm error: could not write into {out}.work/staging: file too large" in err
    assert "Free disk space there (df -h) or raise the file-size limit (ulimit -f)" in err
    assert "output_dir was not touched" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # byte for byte
    assert max_weight_diff(out, teacher_artifact) == 0.0 and slm_json(out)["stage"] == "teacher"
    assert not (tmp_path / "artifact.lock").exists()


def test_disk_full_while_checkpointing_is_a_clear_error(tmp_path, record_message):
    out = tmp_path / "artifact"
    proc = cli(["teacher", *TEACHER, "train.max_steps=4", "train.save_every=1", f"output_dir={out}",
                f"hydra.run.dir={tmp_path}/logs"], cwd=tmp_path, preexec_fn=small_file_limit)
    err = " ".join(record_message(proc.stderr).split())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in err
    assert f"slm error: could not save the checkpoint of step 1 in {out}.work/checkpoints" in err
    assert "Is the disk full (df -h) or a file-size limit set (ulimit -f)?" in err
    assert not out.exists() and not (tmp_path / "artifact.lock").exists()
