"""Turn slm's `train` and `deepspeed` config groups into a DeepSpeed config dict.

Pure Python (no deepspeed import) so it is unit-tested directly. A user's own DeepSpeed
JSON (`deepspeed.config_file=`) is respected: slm fills the keys it leaves unset or marks
"auto", and a key set to a different value than the Hydra config asks for is an error
that names both, rather than one silently winning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slm_cli.errors import SlmError

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _set_path(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def build_ds_config(train, ds, world_size: int) -> dict:
    """DeepSpeed config for one training stage.

    The optimizer is declared in the DeepSpeed config only when optimizer state is offloaded
    (DeepSpeed then uses its CPU Adam); otherwise the caller passes a torch AdamW, which needs
    no compiled op.
    """
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 10**9,  # slm prints its own progress
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        # DeepSpeed's default, pinned because train.nonfinite relies on it: a step whose gradients hold
        # NaN/inf is not applied (ZeRO 1-2 in fp32 and ZeRO-3 always check; in bf16 this switch decides).
        config["bf16"]["check_grad_overflow"] = True
    if ds.offload_optimizer == "cpu":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay": train.weight_decay},
        }
    if ds.config_file:
        config = merge_user_config(config, ds.config_file)
    return config


def frozen_zero3_config(student: dict, *, bf16: bool, hidden_size: int) -> dict:
    """DeepSpeed config that shards a frozen model (the teacher) the way a ZeRO-3 student is sharded.

    No optimizer, so DeepSpeed only partitions the weights and gathers each layer's around its
    forward. Parameters smaller than 10 x hidden_size (norms, biases) stay whole on every rank:
    gathering them costs more than it saves (the same threshold TRL uses for its reference model).
    """
    zero = student["zero_optimization"]
    frozen: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden_size}
    if "offload_param" in zero:
        frozen["offload_param"] = dict(zero["offload_param"])
    return {
        "train_micro_batch_size_per_gpu": student["train_micro_batch_size_per_gpu"],
        "train_batch_size": student["train_batch_size"],
        "gradient_accumulation_steps": student["gradient_accumulation_steps"],
        "zero_optimization": frozen,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def merge_user_config(ours: dict, path: str) -> dict:
    """Overlay slm's values onto a user's DeepSpeed JSON; conflicting values are an error."""
    p = Path(path)
    if not p.is_file():
        raise SlmError(f"deepspeed.config_file={path}: no such file. Give the path of a DeepSpeed JSON config.")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise SlmError(f"deepspeed.config_file={path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
    if not isinstance(user, dict):
        raise SlmError(f"deepspeed.config_file={path} must hold a JSON object.")
    flat_user = _flatten(user)
    conflicts = [
        f"{key}: {flat_user[key]!r} in {path}, but the slm config gives {value!r}"
        for key, value in _flatten(ours).items()
        if key in flat_user and flat_user[key] != "auto" and flat_user[key] != value
    ]
    if conflicts:
        raise SlmError(
            "deepspeed.config_file conflicts with the slm config:\n  - "
            + "\n  - ".join(conflicts)
            + "\nMake them agree: change the JSON, or set the matching slm fields "
            "(train.micro_batch_size, train.grad_accum, train.max_grad_norm, train.precision, deepspeed.zero_stage, "
            "deepspeed.offload_optimizer, deepspeed.offload_param)."
        )
    merged = json.loads(json.dumps(user))
    for key, value in _flatten(ours).items():
        _set_path(merged, key, value)
    return merged
