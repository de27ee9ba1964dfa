"""Resume checkpoints: a power loss's leftovers fall back to the previous good checkpoint, only
checkpoints this user's slm signed are ever unpickled, a resumed run's metrics describe the whole
run, and the default output_dir (a new timestamped folder each run) still continues on a rerun."""

import json
import os
import pickle
import shutil
import signal
import stat
import time

import pytest

from slm_cli.engine import checkpoint
from slm_cli.errors import SlmError
from slm_cli.pretrained import file_sha256
from tests.reliability.common import TEACHER, cli, cli_env, max_weight_diff, run_slm, running, slm_json, wait_for_rows

pytestmark = pytest.mark.reliability

STEPS = 6
CRASH = 4  # the crashed run saves every step and is killed after step 4's checkpoint
RUN = [*TEACHER, f"train.max_steps={STEPS}"]
TOL = 1e-6


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: what every interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    assert run_slm("teacher", *RUN, f"output_dir={root}/artifact", f"hydra.run.dir={root}/logs") == 0
    return root / "artifact"


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A run killed (SIGKILL) right after step 4's checkpoint: its work folder, kept pristine to copy from."""
    root = tmp_path_factory.mktemp("crashed")
    args = ["teacher", *RUN, "train.save_every=1", f"output_dir={root}/run", f"hydra.run.dir={root}/logs"]
    proc = cli(args, cwd=root, env=cli_env(SLM_TEST_KILL_AT=f"after-checkpoint:{CRASH}"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    shutil.copytree(root / "run.work", root / "pristine.work")
    return {"root": root, "args": args}


def fresh_copy(crashed) -> tuple[list, "os.PathLike"]:
    """The crashed run's work folder as it was after the kill, at the path its config names."""
    root = crashed["root"]
    for p in (root / "run", root / "run.work"):
        shutil.rmtree(p, ignore_errors=True)
    shutil.copytree(root / "pristine.work", root / "run.work")
    return crashed["args"], root / "run.work" / "checkpoints"


def biggest_file(tag_dir):
    return max((p for p in tag_dir.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)


def test_only_the_last_two_checkpoints_are_kept(crashed):
    _, ckpts = fresh_copy(crashed)
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step")) == [f"step{CRASH - 1}", f"step{CRASH}"]


def test_damaged_newest_checkpoint_falls_back_and_metrics_cover_the_whole_run(slm, crashed, straight, capsys, record_message):
    args, ckpts = fresh_copy(crashed)
    # What a power loss can leave: an empty `latest` pointer and a truncated checkpoint file.
    (ckpts / "latest").write_text("")
    victim = biggest_file(ckpts / f"step{CRASH}")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cut = victim.stat().st_size
    first_part = {r["step"]: r for r in map(json.loads, (ckpts.parent / "metrics.jsonl").read_text().splitlines())}

    assert slm(*args) == 0
    out = " ".join(capsys.readouterr().out.split())
    record_message(out[out.index("warning: skipped"):out.index("resuming")])
    assert (f"warning: skipped checkpoint step{CRASH}: its file {victim.name} ({cut} bytes) "
            "is not the file that was saved (truncated or changed)") in out
    assert f"at step {CRASH - 1}" in out
    resumed = crashed["root"] / "run"
    assert max_weight_diff(resumed, straight) <= TOL
    whole, got = slm_json(straight)["metrics"], slm_json(resumed)["metrics"]
    assert got["tokens"] == whole["tokens"]
    assert got["first_train_loss"] == pytest.approx(whole["first_train_loss"], abs=TOL)
    assert got["train_seconds"] >= first_part[CRASH - 1]["elapsed_s"]
    assert got["tokens_per_s"] == pytest.approx(got["tokens"] / got["train_seconds"])


def test_a_save_cut_off_by_a_kill_is_skipped(slm, crashed, straight, capsys):
    """Killed inside DeepSpeed's save: the tag has some of its files and no marker yet."""
    args, ckpts = fresh_copy(crashed)
    (ckpts / f"step{CRASH}" / checkpoint.MARKER).unlink()
    biggest_file(ckpts / f"step{CRASH}").unlink()

    assert slm(*args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"warning: skipped checkpoint step{CRASH}: it has no slm_resume.json (its save did not finish)" in out
    assert f"at step {CRASH - 1}" in out
    assert max_weight_diff(crashed["root"] / "run", straight) <= TOL


def test_no_checkpoint_that_loads_is_a_clear_error(slm, crashed, capsys, record_message):
    args, ckpts = fresh_copy(crashed)
    (ckpts / f"step{CRASH}" / checkpoint.MARKER).write_text("")
    victim = biggest_file(ckpts / f"step{CRASH - 1}")
    victim.write_bytes(b"")

    assert slm(*args) == 2
    err = " ".join(capsys.readouterr().err.split())
    record_message(err[err.find("slm error:"):])
    assert f"none of the checkpoints in {ckpts} can be resumed from" in err
    assert f"step{CRASH}: its slm_resume.json is empty (a save cut off by a crash or power loss)" in err
    assert f"step{CRASH - 1}: its file {victim.name} (0 bytes) is not the file that was saved" in err
    assert "Run with resume=false to start afresh" in err and "Traceback" not in err


class _Planted:
    """A pickle that, when unpickled, creates a file: what a planted checkpoint could do with any code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_not_signed_by_this_user_is_never_unpickled(slm, crashed, capsys, tmp_path, record_message):
    args, ckpts = fresh_copy(crashed)
    ran = tmp_path / "planted-code-ran"
    newest, older = ckpts / f"step{CRASH}", ckpts / f"step{CRASH - 1}"
    # A file swapped under a genuine marker, and a whole tag signed with someone else's key.
    biggest_file(newest).write_bytes(pickle.dumps(_Planted(ran)))
    victim = biggest_file(older)
    victim.write_bytes(pickle.dumps(_Planted(ran)))
    marker = json.loads((older / checkpoint.MARKER).read_text())
    marker["files"][victim.name] = file_sha256(victim)
    body = {k: marker[k] for k in ("tag", "step", "config_hash", "files")}
    marker["signature"] = checkpoint._sign(b"k" * 32, body)
    (older / checkpoint.MARKER).write_text(json.dumps(marker))

    code = slm(*args, "resume=true")
    assert not ran.exists(), "a planted pickle was loaded"
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    record_message(err[err.find("slm error:"):])
    assert f"step{CRASH}: its file {biggest_file(newest).name}" in err
    assert (f"step{CRASH - 1}: the signature of its slm_resume.json does not match your key "
            f"{checkpoint.key_path()}: this checkpoint was not written by your slm, or was changed since") in err


def test_signing_key_is_private_and_refused_when_others_can_read_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_CACHE", str(tmp_path / "cache"))
    assert checkpoint.signing_key() is None  # reading never makes one
    key = checkpoint.signing_key(create=True)
    path = checkpoint.key_path()
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert checkpoint.signing_key(create=True) == key  # made once, then reused
    path.chmod(0o640)
    with pytest.raises(SlmError, match=r"has mode 0640: others can read or change it"):
        checkpoint.signing_key()
    path.chmod(0o600)
    elsewhere = tmp_path / "someone-elses.key"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    with pytest.raises(SlmError, match=r"it must be a regular file, not a symlink"):
        checkpoint.signing_key()
    path.unlink()
    elsewhere.rename(path)
    if os.getuid() == 0:  # only root can give a file away
        os.chown(path, 65534, -1)
        with pytest.raises(SlmError, match=r"belongs to uid 65534, not to you"):
            checkpoint.signing_key()


def test_rerunning_the_default_command_continues_the_interrupted_run(slm, tmp_path, straight, capsys, record_message):
    """No output_dir, no hydra.run.dir: each run gets outputs/teacher/<timestamp>/artifact."""
    args = ["teacher", *RUN]
    with running(args, cwd=tmp_path, env=cli_env(SLM_TEST_PAUSE_AT="after-step:1")) as proc:
        metrics = _wait_for_file(tmp_path, "outputs/teacher/*/artifact.work/metrics.jsonl", proc)
        wait_for_rows(metrics, proc, rows=1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    err = " ".join(err.split())
    assert proc.returncode == 2, err[-3000:]
    record_message(err[err.find("slm error:"):])
    first = metrics.parent.with_name("artifact")
    assert (f"stopped by SIGTERM after step 1 of {STEPS}; checkpoint saved in {first}.work/checkpoints. Run the same "
            f"command again to continue from it: slm {' '.join(args)} output_dir={first}") in err

    assert slm(*args) == 0  # the very same command, from the same folder
    out = " ".join(capsys.readouterr().out.split())
    assert f"continuing the interrupted run in {first} (same config, checkpoint of step 1)" in out
    published = list((tmp_path / "outputs").rglob("slm.json"))
    assert published == [first / "slm.json"]
    assert max_weight_diff(first, straight) <= TOL
    assert not first.with_name("artifact.work").exists()


def _wait_for_file(root, pattern, proc, timeout: float = 240):
    """The first file matching `pattern` under `root`, once the run has created it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before creating {pattern}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {root} within {timeout}s")


def test_the_rerun_command_gives_back_a_recipe_and_drops_what_would_not_continue(monkeypatch, tmp_path):
    from slm_cli.paths import RECIPE_DIR

    recipe = ["--config-dir", str(RECIPE_DIR / "teacher"), "--config-name", "tiny-zero2-offload"]
    monkeypatch.setattr("sys.argv", ["slm-teacher", *recipe, "train.lr=1e-4", "resume=false", "output_dir=old",
                                     "data.source=my data.jsonl"])
    monkeypatch.delenv("SLM_LAUNCHED", raising=False)
    assert checkpoint.rerun_command(tmp_path / "out") == (
        f"slm teacher recipe=tiny-zero2-offload train.lr=1e-4 'data.source=my data.jsonl' output_dir={tmp_path / 'out'}"
    )
    # a file of the user's (--config, which the dispatcher turned into --config-dir/--config-name) comes back as --config
    monkeypatch.setattr("sys.argv", ["slm-teacher", "--config-dir", "/home/me/cfg", "--config-name", "mine", "train.lr=1e-4"])
    assert checkpoint.rerun_command(tmp_path / "b") == f"slm teacher --config /home/me/cfg/mine.yaml train.lr=1e-4 output_dir={tmp_path / 'b'}"
    # under the deepspeed launcher the worker's command line carries the run folder the launcher pinned
    monkeypatch.setattr("sys.argv", ["slm-teacher", "hydra.run.dir=/x/logs", "train.lr=1e-4", "output_dir=/x/a"])
    monkeypatch.setenv("SLM_LAUNCHED", "1")
    assert checkpoint.rerun_command(tmp_path / "a") == f"slm teacher train.lr=1e-4 output_dir={tmp_path / 'a'}"
