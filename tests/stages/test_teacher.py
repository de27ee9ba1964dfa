"""`slm teacher` end to end on tiny models: the real CLI, the real DeepSpeed engine, real checkpoints."""

import json
import os
from pathlib import Path

import pytest
import torch

from slm_cli.engine.checkpoint import MARKER
from tests.stages.helpers import FAST, hold_lock, loss_fell, meta, metrics_rows, reloaded_val_loss, run_cli

SMALL_MODEL = ["model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128"]

MATRIX = {
    "llama-zero0": ["model=tiny-llama", "deepspeed=zero0"],
    "qwen3-zero0-gc": ["model=tiny-qwen3", "deepspeed=zero0", "train.gradient_checkpointing=true"],
    "llama-zero2-offload-gc": ["model=tiny-llama", "deepspeed=zero2-offload", "train.gradient_checkpointing=true"],
    "qwen3-zero3": ["model=tiny-qwen3", "deepspeed=zero3"],
    "llama-zero2-bf16": ["model=tiny-llama", "deepspeed=zero2", "train.precision=bf16"],
    "qwen3-lora": ["model=tiny-qwen3", "train.lora.enabled=true", "train.lora.r=4", "train.lr=1e-2"],
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_teacher_matrix(slm, tmp_path, name):
    out = tmp_path / "teacher"
    rc = slm("teacher", *MATRIX[name], *SMALL_MODEL, *FAST, f"output_dir={out}")
    assert rc == 0
    m = meta(out)
    assert m["stage"] == "teacher"
    for key in ("config", "parents", "metrics", "versions", "content_hash", "created"):
        assert key in m, key
    assert m["versions"]["deepspeed"] == "0.19.8"
    first, last = loss_fell(out)
    assert last < first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert len(metrics_rows(out)) == 16
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (tmp_path / "teacher.work").exists(), "work folder should be cleaned after success"
    # the saved artifact, loaded with plain transformers, reproduces the trained model's validation loss
    tol = 2e-2 if "bf16" in name else 1e-4
    assert reloaded_val_loss(out) == pytest.approx(m["metrics"]["val_loss"], rel=tol)


def test_existing_output_refused_then_overwritten(slm, tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert slm("teacher", "model=tiny-llama", *SMALL_MODEL, *FAST, f"output_dir={out}") == 2
    assert (out / "keep.txt").read_text() == "old"
    # overwrite=true replaces only slm's own output; a folder of the user's needs overwrite=force
    assert slm("teacher", "model=tiny-llama", *SMALL_MODEL, *FAST, "train.max_steps=2", f"output_dir={out}", "overwrite=true") == 2
    assert (out / "keep.txt").read_text() == "old"
    assert slm("teacher", "model=tiny-llama", *SMALL_MODEL, *FAST, "train.max_steps=2", f"output_dir={out}", "overwrite=force") == 0
    assert not (out / "keep.txt").exists() and (out / "slm.json").is_file()
    assert slm("teacher", "model=tiny-llama", *SMALL_MODEL, *FAST, "train.max_steps=2", f"output_dir={out}", "overwrite=true") == 0


def test_sweep_writes_separate_artifacts(slm, tmp_path):
    rc = slm("teacher", "-m", "train.lr=1e-3,3e-4", "model=tiny-llama", *SMALL_MODEL, *FAST, "train.max_steps=3")
    assert rc == 0
    arts = sorted(Path(tmp_path, "multirun").rglob("artifact/slm.json"))
    assert len(arts) == 2
    lrs = sorted(meta(a.parent)["config"]["train"]["lr"] for a in arts)
    assert lrs == [3e-4, 1e-3]


def test_resume_after_kill_matches_uninterrupted(slm, tmp_path):
    common = ["model=tiny-llama", *SMALL_MODEL, *FAST, "train.max_steps=8", "train.save_every=4", "deepspeed=zero2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert slm("teacher", *common, f"output_dir={straight}") == 0
    env = dict(os.environ, SLM_TEST_KILL_AT="after-checkpoint:4")
    proc = run_cli(["teacher", *common, f"output_dir={resumed}", f"hydra.run.dir={tmp_path}/logs"], env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed hard right after the step-4 checkpoint
    assert not resumed.exists(), "a killed run must not leave an artifact"
    assert (tmp_path / "resumed.work" / "checkpoints" / "step4").is_dir()
    # another config aimed at the unfinished run is refused rather than silently mixed in
    assert slm("teacher", *common, "train.lr=1e-4", f"output_dir={resumed}") == 2
    # the same command again continues it (resume=auto is the default)
    assert slm("teacher", *common, f"output_dir={resumed}") == 0
    a, b = metrics_rows(straight), metrics_rows(resumed)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # bit for bit
    assert meta(resumed)["metrics"]["val_loss"] == meta(straight)["metrics"]["val_loss"]


def test_two_processes_with_deepspeed_launcher(tmp_path):
    out = tmp_path / "ddp"
    proc = run_cli(
        ["teacher", "launcher=ddp2", "deepspeed=zero2", "model=tiny-llama", *SMALL_MODEL, *FAST, "train.micro_batch_size=8",
         f"output_dir={out}", f"hydra.run.dir={tmp_path}/logs"],
        env=dict(os.environ, DS_ACCELERATOR="cpu"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = meta(out)
    assert m["config"]["launcher"]["nproc_per_node"] == 2
    first, last = loss_fell(out)
    assert last < first
    assert reloaded_val_loss(out) == pytest.approx(m["metrics"]["val_loss"], rel=1e-4)


def test_too_many_processes_is_refused(tmp_path):
    proc = run_cli(["teacher", "launcher.nproc_per_node=64", "model=tiny-llama", f"output_dir={tmp_path}/x", f"hydra.run.dir={tmp_path}/logs"])
    assert proc.returncode == 2
    assert "launcher.nproc_per_node=64" in proc.stderr and "set launcher.nproc_per_node to at most" in proc.stderr


def test_a_second_run_on_the_same_output_is_refused(slm, tmp_path, capsys):
    out = tmp_path / "locked"
    owner = hold_lock(out)
    try:
        assert slm("teacher", "model=tiny-llama", *SMALL_MODEL, *FAST, f"output_dir={out}") == 2
        assert f"pid {owner.pid}) is writing output_dir" in capsys.readouterr().err
        assert not out.exists()
    finally:
        owner.kill()
        owner.wait()
    # the owner is gone (killed: its lock file is left behind, but the kernel released the lock) and the run proceeds
    assert (tmp_path / "locked.lock").exists()
    assert slm("teacher", "model=tiny-llama", *SMALL_MODEL, *FAST, "train.max_steps=1", f"output_dir={out}") == 0
    assert (out / "slm.json").is_file() and not (tmp_path / "locked.lock").exists()


# A learning rate this large makes step 1's Adam update throw the weights to ~1e29 (still finite),
# so step 2's gradients overflow: a deterministic non-finite step on a tiny model.
EXPLODE = ["model=tiny-llama", *SMALL_MODEL, *FAST, "train.lr=1e30", "train.max_grad_norm=0", "train.save_every=1"]


def test_nonfinite_step_stops_with_a_message_and_keeps_the_last_good_checkpoint(slm, tmp_path, capsys):
    out = tmp_path / "diverged"
    assert slm("teacher", *EXPLODE, "train.max_steps=4", f"output_dir={out}") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "training stopped: step 2 has a non-finite loss or gradient norm" in err and "gradient norm nan" in err
    assert "Try a lower train.lr (now 1e+30), gradient clipping (train.max_grad_norm=1.0; now 0 = off)" in err
    assert "train.nonfinite=skip_step" in err and "Traceback" not in err
    ckpts = tmp_path / "diverged.work" / "checkpoints"
    assert (ckpts / "step1" / MARKER).is_file(), "the last good checkpoint is kept"
    assert not (ckpts / "step2").exists(), "no checkpoint of the non-finite step"
    assert not out.exists()
    rows = [json.loads(line) for line in (tmp_path / "diverged.work" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, False), (2, True)]


def _tensors(obj, path: str, out: dict) -> dict:
    """Every tensor of a checkpoint file by its path, and the optimizer's step counters."""
    if torch.is_tensor(obj):
        out[path] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{path}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{path}/{i}", out)
    elif isinstance(obj, int) and path.endswith("/step") and "/state/" in path:
        out[path] = torch.tensor(obj)
    return out


def checkpoint_state(tag_dir: Path) -> dict:
    """Weights and optimizer state saved in one DeepSpeed checkpoint tag (the RNG state and the client's step excluded)."""
    found: dict = {}
    for f in sorted(tag_dir.glob("*.pt")):
        _tensors(torch.load(f, map_location="cpu", weights_only=False), f.name, found)
    return {k: v for k, v in found.items() if "/rng" not in k}


@pytest.mark.parametrize(
    "layout",
    [
        ["deepspeed=zero0"],  # a plain torch AdamW: slm drops the gradients itself
        ["deepspeed=zero3", "train.precision=bf16"],  # DeepSpeed's own overflow check, bf16 master weights
        pytest.param(["deepspeed=zero0", "train.precision=bf16"], marks=pytest.mark.slow),
        pytest.param(["deepspeed=zero1"], marks=pytest.mark.slow),
        pytest.param(["deepspeed=zero2"], marks=pytest.mark.slow),
        pytest.param(["deepspeed=zero2-offload"], marks=pytest.mark.slow),  # DeepSpeed's CPU Adam
        pytest.param(["deepspeed=zero3-offload"], marks=pytest.mark.slow),
    ],
    ids=["zero0", "zero3-bf16", "zero0-bf16", "zero1", "zero2", "zero2-offload", "zero3-offload"],
)
def test_skip_step_leaves_weights_and_optimizer_state_untouched(slm, tmp_path, capsys, layout):
    out = tmp_path / "skipping"
    command = ["teacher", *EXPLODE, *layout, "train.max_steps=4", "train.nonfinite=skip_step", f"output_dir={out}"]
    proc = run_cli([*command, f"hydra.run.dir={tmp_path}/logs"], env=dict(os.environ, SLM_TEST_KILL_AT="after-checkpoint:2"))
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = tmp_path / "skipping.work" / "checkpoints"
    after1, after2 = checkpoint_state(ckpts / "step1"), checkpoint_state(ckpts / "step2")
    assert after1.keys() == after2.keys() and any("exp_avg" in k for k in after1)
    changed = [k for k in after1 if not torch.equal(after1[k], after2[k])]
    assert not changed, f"the skipped step 2 changed {changed}"

    assert slm(*command) == 0  # resumes after step 2 and skips the rest, which stay non-finite
    rows = metrics_rows(out)
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, False), (2, True), (3, True), (4, True)]
    assert meta(out)["metrics"]["skipped_steps"] == 3, "counted over the whole run, across the resume"
    assert "3 of 4 steps had a non-finite loss or gradient norm and were skipped" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_skip_step_on_two_processes_agrees_across_ranks(tmp_path):
    """Every rank takes the same skip decision (a rank that alone stepped or stopped would hang the others)."""
    out = tmp_path / "ddp"
    proc = run_cli(
        ["teacher", *EXPLODE, "launcher=ddp2", "deepspeed=zero2", "train.micro_batch_size=8", "train.max_steps=4",
         "train.nonfinite=skip_step", f"output_dir={out}", f"hydra.run.dir={tmp_path}/logs"],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["skipped"] for r in metrics_rows(out)] == [False, True, True, True]
    assert meta(out)["metrics"]["skipped_steps"] == 3
