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
