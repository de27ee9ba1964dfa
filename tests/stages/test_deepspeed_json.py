"""`slm teacher deepspeed.config_file=<Hugging Face-style JSON>`: real runs with each documented kind of config.

The fixtures (tests/fixtures/deepspeed/) follow the examples of the transformers DeepSpeed docs: ZeRO-2 and
ZeRO-3, with CPU offload, "auto" values, steps_per_print, optimizer and scheduler blocks. Each run checks that
training works (finite losses, a published artifact) and that the settings used are the JSON's: the ZeRO stage,
the batch sizes, the learning rate of every step from the JSON's schedule.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.stages.helpers import meta, metrics_rows

FIXTURES = Path(__file__).parents[1] / "fixtures" / "deepspeed"
# No train.micro_batch_size / train.warmup_steps here: named on the command line, they would override the JSON.
TINY = ["model=tiny-llama", "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
        "data.train_size=128", "data.val_size=16", "data.test_size=8", "train.eval_every=0", "train.eval_batches=1"]
STEPS = 4


def _warmup_decay(peak, warmup, total, linear):
    """DeepSpeed's WarmupLR (total=None) / WarmupDecayLR learning rate after scheduler step `it` (0-based)."""
    def lr(it):
        w = max(2, warmup)
        if it < w:
            return peak * (it / w if linear else math.log(it + 1) / math.log(w))
        return peak if total is None else peak * max(0.0, (total - it) / max(1.0, total - w))
    return lr


def _warmup_cosine(peak, warmup, total, min_ratio):
    def lr(it):
        w = max(2, warmup)
        if it < w:
            return peak * it / w
        progress = min(1.0, (it - w + 1) / max(1, total - w))
        return peak * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)
    return lr


# fixture -> (settings slm.json must record, the DeepSpeed config keys to check, lr after step k (1-based))
CASES = {
    "zero2_auto": (
        {"deepspeed.zero_stage": 2, "train.lr_schedule": "cosine", "train.micro_batch_size": 16},
        {"steps_per_print": 500, "zero_optimization.reduce_bucket_size": 64 * 64},
        lambda k: 3e-3 * (k + 1) / 6,  # no scheduler block: slm's own warm-up (configs/train/default.yaml: 5 steps)
    ),
    "zero2_offload_adamw_warmuplr": (
        {"deepspeed.zero_stage": 2, "deepspeed.offload_optimizer": "cpu", "train.lr_schedule": "deepspeed", "train.lr": 3e-3},
        {"steps_per_print": 1, "optimizer.params.lr": 3e-3, "scheduler.params.warmup_num_steps": 5},
        lambda k: _warmup_decay(3e-3, 5, None, linear=False)(k - 1),  # WarmupLR's default warm-up is logarithmic
    ),
    "zero3_offload_auto": (
        {"deepspeed.zero_stage": 3, "deepspeed.offload_param": "cpu", "deepspeed.offload_optimizer": "cpu",
         "train.lr": 2e-3, "train.max_grad_norm": 0.5, "train.warmup_steps": 2},
        {"zero_optimization.stage3_param_persistence_threshold": 640, "scheduler.params.total_num_steps": STEPS},
        lambda k: _warmup_decay(2e-3, 2, STEPS, linear=True)(k - 1),
    ),
    "zero1_adamw_cosine_bf16": (
        {"deepspeed.zero_stage": 1, "train.precision": "bf16", "train.micro_batch_size": 8, "train.grad_accum": 2,
         "train.lr": 5e-3, "train.weight_decay": 0.01, "train.min_lr_ratio": 0.2},
        {"optimizer.params.torch_adam": True, "optimizer.params.betas": [0.9, 0.999], "train_batch_size": 16},
        lambda k: _warmup_cosine(5e-3, 2, STEPS, 0.2)(k - 1),
    ),
}


def _get(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


def _no_auto(d) -> bool:
    if isinstance(d, dict):
        return all(_no_auto(v) for v in d.values())
    return d != "auto"


@pytest.mark.parametrize("name", list(CASES))
def test_hf_style_json_trains_with_its_own_settings(slm, tmp_path, name):
    out = tmp_path / "teacher"
    rc = slm("teacher", *TINY, f"train.max_steps={STEPS}", f"deepspeed.config_file={FIXTURES / f'{name}.json'}",
             f"output_dir={out}")
    assert rc == 0
    recorded, ds_keys, lr_after = CASES[name]
    config = meta(out)["config"]
    for key, want in recorded.items():
        assert _get(config, key) == want, key
    used = json.loads((out / "deepspeed_config.json").read_text())
    assert _no_auto(used)
    for key, want in ds_keys.items():
        assert _get(used, key) == want, key
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert [r["lr"] for r in rows] == pytest.approx([lr_after(k) for k in range(1, STEPS + 1)], rel=1e-6, abs=1e-12)
    assert (out / "model.safetensors").is_file() and math.isfinite(meta(out)["metrics"]["val_ce"])


def test_command_line_values_win_and_the_replaced_json_values_are_named(slm, tmp_path, capfd):
    out = tmp_path / "teacher"
    rc = slm("teacher", *TINY, "train.max_steps=2", f"deepspeed.config_file={FIXTURES / 'zero3_offload_auto.json'}",
             "deepspeed.zero_stage=2", "train.lr=1e-2", "train.lr_schedule=constant", "train.warmup_steps=0",
             f"output_dir={out}")
    assert rc == 0
    printed = capfd.readouterr().out
    assert "deepspeed.zero_stage=2 (yours) replaces zero_optimization.stage=3" in printed
    assert "train.lr=0.01 (yours) replaces optimizer.params.lr=0.002" in printed
    assert "train.lr_schedule=constant (yours) replaces the scheduler block (WarmupDecayLR)" in printed
    assert "zero_optimization.offload_param of" in printed  # ZeRO-2 cannot offload parameters
    config = meta(out)["config"]
    assert config["deepspeed"]["zero_stage"] == 2 and config["deepspeed"]["offload_param"] == "none"
    assert config["deepspeed"]["offload_optimizer"] == "cpu" and config["train"]["max_grad_norm"] == 0.5  # the JSON's
    used = json.loads((out / "deepspeed_config.json").read_text())
    assert used["zero_optimization"]["stage"] == 2 and "scheduler" not in used
    assert [r["lr"] for r in metrics_rows(out)] == [1e-2, 1e-2]


def test_a_recipe_value_wins_over_the_json(slm, tmp_path):
    """tiny-zero2-offload sets ZeRO-2 for slm: the JSON's stage 3 gives way; what the recipe leaves unset is the JSON's."""
    out = tmp_path / "teacher"
    rc = slm("teacher", "recipe=tiny-zero2-offload", *TINY, "train.max_steps=2",
             f"deepspeed.config_file={FIXTURES / 'zero3_offload_auto.json'}", f"output_dir={out}")
    assert rc == 0
    config = meta(out)["config"]
    assert config["deepspeed"]["zero_stage"] == 2 and config["train"]["gradient_checkpointing"] is True
    assert config["train"]["lr"] == 2e-3 and config["train"]["lr_schedule"] == "deepspeed"


def _engine(fixture: str):
    """A real DeepSpeed engine over a 1-layer Llama, configured from `fixture` as a stage would."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slm_cli.config.schema import DeepSpeedConfig, TrainConfig
    from slm_cli.engine import loop
    from slm_cli.engine.dsconfig import adopt_user_config

    values = {"stage": "teacher", "train": {"lr_schedule": "cosine"},
              "deepspeed": {"zero_stage": 0, "offload_optimizer": "none", "offload_param": "none",
                            "config_file": str(FIXTURES / fixture)}}
    adopt_user_config(values, explicit=set())
    tcfg, dcfg = TrainConfig(max_steps=4, **values["train"]), DeepSpeedConfig(**values["deepspeed"])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    return loop.initialize(model, tcfg, dcfg)[0]


def test_optimizer_block_runs_torch_adamw_or_cpu_adam_in_a_real_engine():
    """Without offload DeepSpeed is asked for torch's AdamW, never its fused Adam (a long JIT build on a CPU);
    offloaded, it runs its CPU Adam."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupLR

    engine = _engine("zero1_adamw_cosine_bf16.json")
    assert type(engine.basic_optimizer) is torch.optim.AdamW
    assert engine.basic_optimizer.defaults["betas"] == (0.9, 0.999) and engine.basic_optimizer.defaults["eps"] == 1e-6
    assert isinstance(engine.lr_scheduler, WarmupCosineLR)
    assert engine.zero_optimization_stage() == 1 and engine.bfloat16_enabled()
    engine = _engine("zero2_offload_adamw_warmuplr.json")
    assert type(engine.basic_optimizer) is DeepSpeedCPUAdam
    assert type(engine.lr_scheduler) is WarmupLR and engine.zero_optimization_stage() == 2


def test_resume_under_the_json_scheduler_matches_the_uninterrupted_run(slm, tmp_path):
    """The JSON's scheduler (DeepSpeed's, not slm's) is checkpointed and restored: same lr and loss every step."""
    import os

    from tests.stages.helpers import run_cli

    common = ["teacher", *TINY, f"train.max_steps={STEPS}", "train.save_every=2",
              f"deepspeed.config_file={FIXTURES / 'zero1_adamw_cosine_bf16.json'}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert slm(*common, f"output_dir={straight}") == 0
    env = dict(os.environ, SLM_TEST_KILL_AT="after-checkpoint:2")
    proc = run_cli([*common, f"output_dir={resumed}", f"hydra.run.dir={tmp_path}/logs"], env=env, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert slm(*common, f"output_dir={resumed}") == 0
    a, b = metrics_rows(straight), metrics_rows(resumed)
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
