"""DeepSpeed config building from slm's config groups, and a user's own (Hugging Face-style) DeepSpeed JSON."""

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from slm_cli.config.schema import DeepSpeedConfig, TrainConfig
from slm_cli.engine.dsconfig import adopt_user_config, explicit_from, build_ds_config, frozen_zero3_config
from slm_cli.errors import SlmError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "deepspeed"


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


def test_frozen_zero3_config_shards_without_an_optimizer():
    student = build_ds_config(
        TrainConfig(micro_batch_size=4, grad_accum=2), DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", offload_param="cpu"), 2
    )
    frozen = frozen_zero3_config(student, bf16=True, hidden_size=64)
    assert "optimizer" not in frozen and "gradient_clipping" not in frozen
    assert frozen["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 640,
                                           "offload_param": {"device": "cpu", "pin_memory": False}}
    assert frozen["bf16"] == {"enabled": True} and frozen["train_batch_size"] == 16


# --- a user's DeepSpeed JSON ------------------------------------------------------------------


def _values(config_file, **train) -> dict:
    """slm's resolved config as the runner holds it: plain dicts, the defaults of the stage's config."""
    t = asdict(TrainConfig(**{"lr": 3e-3, "micro_batch_size": 16, **train}))
    return {"stage": "teacher", "train": t, "deepspeed": asdict(DeepSpeedConfig(config_file=str(config_file)))}


def _resolve(config_file, explicit=(), world=1, hidden_size=64, **train):
    """adopt (JSON -> slm config), then build (slm config -> DeepSpeed dict), as a stage does."""
    values = _values(config_file, **train)
    notes = adopt_user_config(values, set(explicit))
    tcfg = TrainConfig(**{**values["train"], "lora": TrainConfig().lora})
    dcfg = DeepSpeedConfig(**values["deepspeed"])
    return values, notes, build_ds_config(tcfg, dcfg, world, hidden_size=hidden_size)


def _autos(d) -> list:
    return [k for k, v in (d.items() if isinstance(d, dict) else []) if v == "auto"] + [
        a for v in (d.values() if isinstance(d, dict) else []) for a in _autos(v)
    ]


def test_hf_zero2_auto_takes_the_stage_from_json_fills_auto_and_keeps_steps_per_print():
    values, notes, ds = _resolve(FIXTURES / "zero2_auto.json", grad_accum=2, max_grad_norm=0.7)
    assert notes == []
    assert values["deepspeed"]["zero_stage"] == 2  # from the JSON; no deepspeed.zero_stage=2 needed
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["steps_per_print"] == 500  # the JSON's own setting, no conflict with slm's default
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 and ds["gradient_clipping"] == 0.7
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64  # hidden_size^2, as transformers fills it
    assert ds["zero_optimization"]["allgather_bucket_size"] == 5e7  # keys slm does not know pass through
    assert ds["fp16"]["enabled"] is False and ds["fp16"]["loss_scale_window"] == 500
    assert ds["bf16"]["enabled"] is False
    assert "optimizer" not in ds and "scheduler" not in ds
    assert _autos(ds) == []


def test_hf_zero3_offload_fills_hidden_size_buckets_optimizer_and_scheduler():
    values, _, ds = _resolve(FIXTURES / "zero3_offload_auto.json", max_steps=40)
    t, d = values["train"], values["deepspeed"]
    assert (d["zero_stage"], d["offload_optimizer"], d["offload_param"]) == (3, "cpu", "cpu")
    assert t["lr"] == 2e-3 and t["warmup_steps"] == 2 and t["max_grad_norm"] == 0.5
    assert t["lr_schedule"] == "deepspeed"
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (
        4096, int(0.9 * 4096), 640)
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["optimizer"]["params"] == {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
    assert "torch_adam" not in ds["optimizer"]["params"]  # offloaded: DeepSpeed's CPU Adam
    assert ds["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-3, "warmup_num_steps": 2,
                                         "warmup_type": "linear", "total_num_steps": 40}
    assert _autos(ds) == []
    with pytest.raises(SlmError, match="hidden_size"):
        _resolve(FIXTURES / "zero3_offload_auto.json", hidden_size=None)


def test_optimizer_block_without_offload_asks_deepspeed_for_torch_adamw():
    values, _, ds = _resolve(FIXTURES / "zero1_adamw_cosine_bf16.json")
    t = values["train"]
    assert (t["micro_batch_size"], t["grad_accum"], t["precision"], t["lr"], t["weight_decay"]) == (8, 2, "bf16", 5e-3, 0.01)
    assert t["min_lr_ratio"] == 0.2 and t["warmup_steps"] == 2
    assert ds["optimizer"]["params"]["torch_adam"] is True  # never DeepSpeed's fused Adam (a long JIT build on CPU)
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999] and ds["optimizer"]["params"]["eps"] == 1e-6
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert ds["scheduler"]["params"]["total_num_steps"] == t["max_steps"]
    assert ds["scheduler"]["params"]["warmup_min_ratio"] == 0.0


def test_your_settings_win_over_the_json_and_each_replaced_value_is_named():
    explicit = {"deepspeed.zero_stage", "train.lr", "train.micro_batch_size", "train.lr_schedule"}
    values, notes, ds = _resolve(FIXTURES / "zero3_offload_auto.json", explicit=explicit, lr=1e-2, lr_schedule="constant")
    assert values["train"]["lr"] == 1e-2 and values["train"]["lr_schedule"] == "constant"
    assert "deepspeed.zero_stage=0 (yours) replaces zero_optimization.stage=3" in "\n".join(notes)
    assert any(n.startswith("train.lr=0.01 (yours) replaces optimizer.params.lr=0.002") for n in notes)
    assert any("train.lr_schedule=constant (yours) replaces the scheduler block (WarmupDecayLR)" in n for n in notes)
    assert not any("train.micro_batch_size" in n for n in notes)  # the JSON says "auto" there: nothing replaced
    assert "scheduler" not in ds  # slm's own schedule drives the learning rate
    assert ds["optimizer"]["params"]["lr"] == 1e-2
    # the JSON's other settings still stand where you set nothing; an offload your ZeRO stage cannot run is dropped
    assert values["train"]["max_grad_norm"] == 0.5
    assert values["deepspeed"]["offload_param"] == values["deepspeed"]["offload_optimizer"] == "none"
    assert "zero_optimization.offload_param of " in "\n".join(notes) and "it needs ZeRO-3, and deepspeed.zero_stage=0" in "\n".join(notes)
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"


def test_your_offload_none_turns_the_json_offload_off():
    values, _, _ = _resolve(FIXTURES / "zero3_offload_auto.json", explicit={"deepspeed.offload_param", "deepspeed.offload_optimizer"})
    tcfg = TrainConfig(**{**values["train"], "lora": TrainConfig().lora})
    ds = build_ds_config(tcfg, DeepSpeedConfig(**{**values["deepspeed"], "offload_param": "none", "offload_optimizer": "none"}),
                         1, hidden_size=64)
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_explicit_means_named_on_the_command_line_or_changed_from_the_stage_default():
    defaults = {"train": {"lr": 3e-3, "micro_batch_size": 16}, "deepspeed": {"zero_stage": 0, "offload_param": "none"}}
    values = {"train": {"lr": 3e-3, "micro_batch_size": 16}, "deepspeed": {"zero_stage": 2, "offload_param": "none"}}
    # a recipe or deepspeed=zero2 changed zero_stage; train.micro_batch_size=16 is named though it equals the default
    assert explicit_from(values, ["train.micro_batch_size=16", "deepspeed=zero2"], defaults) == {
        "deepspeed.zero_stage", "train.micro_batch_size", "deepspeed"}


def _write(tmp_path, content) -> Path:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(content))
    return p


@pytest.mark.parametrize("content, message", [
    ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, "optimizer.type='Lamb': slm trains with Adam or AdamW"),
    ({"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}}, "move the value there"),
    ({"scheduler": {"type": "OneCycle", "params": {}}}, "scheduler.type='OneCycle'"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lrr": 1e-3}}}, "warmup_max_lrr not a parameter of WarmupLR"),
    ({"fp16": {"enabled": True}}, "fp16.enabled is true"),
    ({"zero_optimization": {"stage": "two"}}, "zero_optimization.stage='two': expected a whole number >= 0"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "NVMe offload is not supported"),
    ({"train_batch_size": 64}, "train_batch_size=64, but"),
    ({"zero_optimization": {"stage": 1, "some_future_knob": "auto"}}, 'fill "auto" in zero_optimization.some_future_knob'),
])
def test_what_slm_cannot_run_is_refused_naming_the_field_and_the_fix(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(SlmError) as info:
        _resolve(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(SlmError, match="no such file"):
        _resolve(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  \"stage\": 2,\n}")
    with pytest.raises(SlmError, match="not valid JSON \\(line 3"):
        _resolve(bad)


def test_lr_schedule_deepspeed_needs_a_scheduler_block(tmp_path):
    values = _values(None, lr_schedule="deepspeed")
    values["deepspeed"]["config_file"] = None
    with pytest.raises(SlmError, match="no deepspeed.config_file is set"):
        adopt_user_config(values, set())
    with pytest.raises(SlmError, match="has none; add one"):
        adopt_user_config(_values(_write(tmp_path, {"zero_optimization": {"stage": 1}}), lr_schedule="deepspeed"), set())


def test_adopt_leaves_configs_without_a_json_alone():
    values = {"stage": "prune", "model": {"name_or_path": "x"}}
    before = copy.deepcopy(values)
    assert adopt_user_config(values) == [] and values == before


def test_explicit_keys_reads_hydra_overrides_and_group_choices():
    """The Hydra side of explicit_keys, on the shipped teacher config (no training)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from slm_cli.engine.dsconfig import explicit_keys
    from slm_cli.paths import CONFIG_DIR

    overrides = ["deepspeed=zero2-offload", "train.micro_batch_size=16", "train.lr=1e-2"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("teacher", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            values = {"stage": "teacher", "train": OmegaConf.to_container(cfg.train, resolve=True),
                      "deepspeed": OmegaConf.to_container(cfg.deepspeed, resolve=True)}
            keys = explicit_keys(values)
        finally:
            HydraConfig.instance().cfg = None
    # named (16 is also the default), changed by the group choice; offload_param=none is the default and unnamed
    assert {"train.micro_batch_size", "train.lr", "deepspeed.zero_stage", "deepspeed.offload_optimizer"} <= keys
    assert "deepspeed.offload_param" not in keys and "train.grad_accum" not in keys


def test_the_command_line_check_sees_the_json_settings():
    """slm's up-front check validates the config that will run: offload on the command line beside a ZeRO-2 JSON is fine."""
    from slm_cli.config import STAGE_SCHEMAS
    from slm_cli.config.precheck import check_command_line

    (typed,) = check_command_line("teacher", [f"deepspeed.config_file={FIXTURES / 'zero2_auto.json'}",
                                              "deepspeed.offload_optimizer=cpu"], STAGE_SCHEMAS["teacher"])
    assert typed.deepspeed.zero_stage == 2 and typed.deepspeed.offload_optimizer == "cpu"
    with pytest.raises(SlmError, match="no such file"):  # reported before Hydra makes a run folder
        check_command_line("teacher", [f"deepspeed.config_file={FIXTURES / 'missing.json'}"], STAGE_SCHEMAS["teacher"])
