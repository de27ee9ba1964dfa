"""The deepspeed launcher re-runs the same command in every rank, preset included."""

import os

from tests.stages.helpers import meta, run_cli


def test_ranks_run_the_preset_the_user_chose(tmp_path):
    """`recipe=<preset>` is Hydra's --config-dir/--config-name: the ranks must get it too, not only key=value."""
    out = tmp_path / "ddp"
    proc = run_cli(
        ["teacher", "recipe=tiny-zero2-offload", "launcher=ddp2", "train.max_steps=2", "data.train_size=64", "data.val_size=16",
         "train.micro_batch_size=4", f"output_dir={out}", f"hydra.run.dir={tmp_path}/logs"],
        env=dict(os.environ, DS_ACCELERATOR="cpu"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = meta(out)["config"]  # written by rank 0 of the launched run
    assert config["launcher"]["nproc_per_node"] == 2
    assert config["deepspeed"]["zero_stage"] == 2 and config["deepspeed"]["offload_optimizer"] == "cpu"  # the preset's
    assert config["train"]["gradient_checkpointing"] is True


def test_a_bad_model_folder_is_refused_before_the_ranks_start(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    proc = run_cli(
        ["teacher", "launcher=ddp2", "model=hf", f"model.name_or_path={tmp_path / 'model'}", f"output_dir={tmp_path / 'out'}",
         f"hydra.run.dir={tmp_path}/logs"],
        env=dict(os.environ, DS_ACCELERATOR="cpu"),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("config.json is not valid JSON") == 1  # said once, by the first process
    assert "launch.py" not in proc.stdout + proc.stderr  # the deepspeed launcher never started
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()
