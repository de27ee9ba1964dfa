"""DeepSpeed config building from slm's config groups."""

import json

import pytest

from slm_cli.config.schema import DeepSpeedConfig, TrainConfig
from slm_cli.engine.dsconfig import build_ds_config
from slm_cli.errors import SlmError


def test_zero2_offload_declares_cpu_adam_and_batch_sizes():
    cfg = build_ds_config(TrainConfig(micro_batch_size=4, grad_accum=3), DeepSpeedConfig(zero_stage=2, offload_optimizer="cpu"), 2)
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["optimizer"]["type"] == "AdamW"


def test_no_offload_leaves_optimizer_to_torch_and_zero3_gathers_on_save():
    cfg = build_ds_config(TrainConfig(precision="bf16"), DeepSpeedConfig(zero_stage=3), 1)
    assert "optimizer" not in cfg
    assert cfg["bf16"]["enabled"] is True
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_user_json_fills_and_conflicts(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 0, "round_robin_gradients": True}}))
    cfg = build_ds_config(TrainConfig(micro_batch_size=8), DeepSpeedConfig(config_file=str(good)), 1)
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["zero_optimization"]["round_robin_gradients"] is True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 5.0}))
    with pytest.raises(SlmError) as info:
        build_ds_config(TrainConfig(), DeepSpeedConfig(config_file=str(bad)), 1)
    assert "zero_optimization.stage: 3" in str(info.value) and "gradient_clipping" in str(info.value)
    with pytest.raises(SlmError, match="no such file"):
        build_ds_config(TrainConfig(), DeepSpeedConfig(config_file=str(tmp_path / "missing.json")), 1)


def test_frozen_zero3_config_shards_without_an_optimizer():
    from slm_cli.engine.dsconfig import frozen_zero3_config

    student = build_ds_config(
        TrainConfig(micro_batch_size=4, grad_accum=2), DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", offload_param="cpu"), 2
    )
    frozen = frozen_zero3_config(student, bf16=True, hidden_size=64)
    assert "optimizer" not in frozen and "gradient_clipping" not in frozen
    assert frozen["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 640,
                                           "offload_param": {"device": "cpu", "pin_memory": False}}
    assert frozen["bf16"] == {"enabled": True} and frozen["train_batch_size"] == 16
