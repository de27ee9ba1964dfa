"""Turn slm's `train` and `deepspeed` config groups into a DeepSpeed config dict.

Pure Python (no deepspeed import) so it is unit-tested directly.

A user's own DeepSpeed JSON (`deepspeed.config_file=`), such as the examples in the transformers
DeepSpeed docs, is used as written, with two rules:

- Precedence. For a setting both configs hold (`SHARED`: batch sizes, clipping, precision, ZeRO
  stage, offload, learning rate, weight decay, warm-up, the schedule): a value you set for slm
  (on the command line, in a recipe, or by choosing a config group such as `deepspeed=zero3`)
  wins, else the JSON's value, else slm's default. "You set" means: named on the command line, or
  different from what the stage's own config gives (`explicit_keys`). A JSON value that loses is
  named in a note, never dropped silently.
- `"auto"` is filled from slm's config wherever it appears, as transformers' Trainer fills it from
  its TrainingArguments (`HfTrainerDeepSpeedConfig.trainer_config_process/_finalize`), including the
  hidden-size based bucket sizes. That class is not reused: it needs `accelerate` and registers a
  process-wide ZeRO-3 flag that changes how transformers loads every later model.

It happens in two steps. `adopt_user_config` runs before the config is validated and copies the
JSON's concrete values into slm's config, so the stage, its slm.json and the resume check all see
the settings training will use. `build_ds_config` then builds DeepSpeed's dict from that config,
lays it over the JSON (keys slm does not know, such as `steps_per_print` or `overlap_comm`, stay
as the JSON has them) and fills "auto".

The JSON's `optimizer` block must be Adam or AdamW: with the optimizer offloaded DeepSpeed runs
its CPU Adam; otherwise slm asks DeepSpeed for torch's AdamW (`torch_adam`), never its fused Adam,
a CUDA-style op that takes minutes to JIT-compile on a CPU machine. The `scheduler` block must be
one of DeepSpeed's warm-up schedules (`SCHEDULER_PARAMS`); it then drives the learning rate
(`train.lr_schedule=deepspeed`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

from slm_cli.errors import SlmError

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8

_MISSING = object()

# The parameters of DeepSpeed's warm-up schedules (deepspeed/runtime/lr_schedules.py), so a typo is
# named here instead of surfacing as a TypeError from DeepSpeed's constructor.
SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"},
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps"},
    "WarmupCosineLR": {"warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type", "total_num_steps"},
}
OPTIMIZERS = ("Adam", "AdamW")  # DeepSpeed matches optimizer names case-insensitively


def _count(minimum: int) -> Callable[[Any], int]:
    def convert(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"expected a whole number >= {minimum}")
        return v

    return convert


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError("expected a number >= 0")
    return float(v)


def _precision(v: Any) -> str:
    if not isinstance(v, bool):
        raise ValueError('expected true, false or "auto"')
    return "bf16" if v else "fp32"


def _device(v: Any) -> str:
    if v not in ("cpu", "none"):
        raise ValueError('slm offloads to "cpu" or not at all ("none"); NVMe offload is not supported')
    return v


# (slm key, DeepSpeed JSON key, JSON value -> slm value). Where two JSON keys feed one slm key, the
# later one wins: the scheduler's warmup_max_lr is the peak learning rate DeepSpeed actually uses.
SHARED: list[tuple[str, str, Callable[[Any], Any]]] = [
    ("train.micro_batch_size", "train_micro_batch_size_per_gpu", _count(1)),
    ("train.grad_accum", "gradient_accumulation_steps", _count(1)),
    ("train.max_grad_norm", "gradient_clipping", _number),
    ("train.precision", "bf16.enabled", _precision),
    ("deepspeed.zero_stage", "zero_optimization.stage", _count(0)),
    ("deepspeed.offload_optimizer", "zero_optimization.offload_optimizer.device", _device),
    ("deepspeed.offload_param", "zero_optimization.offload_param.device", _device),
    ("train.lr", "optimizer.params.lr", _number),
    ("train.weight_decay", "optimizer.params.weight_decay", _number),
    ("train.lr", "scheduler.params.warmup_max_lr", _number),
    ("train.warmup_steps", "scheduler.params.warmup_num_steps", _count(0)),
    ("train.min_lr_ratio", "scheduler.params.cos_min_ratio", _number),
]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _set_path(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def read_user_config(path: str) -> dict:
    """The user's DeepSpeed JSON, checked for what slm can run (optimizer, scheduler, precision)."""
    p = Path(path)
    if not p.is_file():
        raise SlmError(f"deepspeed.config_file={path}: no such file. Give the path of a DeepSpeed JSON config.")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise SlmError(f"deepspeed.config_file={path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
    if not isinstance(user, dict):
        raise SlmError(f"deepspeed.config_file={path} must hold a JSON object.")
    _check_user_config(user, path)
    return user


def _check_user_config(user: dict, path: str) -> None:
    problems = []
    if _get(user, "fp16.enabled") is True:
        problems.append('fp16.enabled is true: slm trains in fp32 or bf16; set "fp16": {"enabled": false} '
                        '(or "auto") and use "bf16": {"enabled": true} or train.precision=bf16')
    optimizer = user.get("optimizer")
    if optimizer is not None:
        kind = optimizer.get("type") if isinstance(optimizer, dict) else None
        if not isinstance(kind, str) or kind.lower() not in {o.lower() for o in OPTIMIZERS}:
            problems.append(
                f"optimizer.type={kind!r}: slm trains with Adam or AdamW (DeepSpeed's CPU Adam when the optimizer is "
                'offloaded, torch\'s AdamW otherwise); set "type": "AdamW" or remove the optimizer block'
            )
        elif "max_grad_norm" in (optimizer.get("params") or {}):
            problems.append('optimizer.params.max_grad_norm: DeepSpeed clips with the top-level "gradient_clipping" '
                            "(or train.max_grad_norm); move the value there")
    scheduler = user.get("scheduler")
    if scheduler is not None:
        kind = scheduler.get("type") if isinstance(scheduler, dict) else None
        if kind not in SCHEDULER_PARAMS:
            problems.append(
                f"scheduler.type={kind!r}: slm runs DeepSpeed's {', '.join(SCHEDULER_PARAMS)}; use one of them, or "
                "remove the scheduler block and choose train.lr_schedule=cosine|linear|constant"
            )
        else:
            unknown = sorted(set(scheduler.get("params") or {}) - SCHEDULER_PARAMS[kind])
            if unknown:
                problems.append(f"scheduler.params: {', '.join(unknown)} not a parameter of {kind}; "
                                f"it takes {', '.join(sorted(SCHEDULER_PARAMS[kind]))}")
    if problems:
        raise SlmError(f"deepspeed.config_file={path}:\n  - " + "\n  - ".join(problems))


def explicit_keys(values: dict) -> set[str]:
    """The `train.*` / `deepspeed.*` keys the user set for this run of a Hydra stage.

    A key counts when the command line names it (even at its default value), or when its value
    differs from what the stage's own config composes to with no overrides: a recipe, a config
    group choice (`deepspeed=zero3`) or a user's config file set it.
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():  # a library call, not a command: nothing was set on a command line
        return set()
    overrides = list(HydraConfig.get().overrides.task)
    base = compose(config_name=values["stage"])
    defaults = {}
    for group in ("train", "deepspeed"):
        if group in base:
            defaults[group] = OmegaConf.to_container(base[group], resolve=True)
    return explicit_from(values, overrides, defaults)


def explicit_from(values: dict, overrides: list[str], defaults: dict) -> set[str]:
    """`explicit_keys` given the command line's overrides and the stage config's own `defaults`."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    for group in ("train", "deepspeed"):
        now = _flatten(values.get(group) or {}, group)
        base = _flatten(defaults.get(group) or {}, group)
        keys |= {k for k, v in now.items() if base.get(k, _MISSING) != v}
    return keys


def adopt_user_config(values: dict, explicit: set[str] | None = None) -> list[str]:
    """Copy the settings of `deepspeed.config_file` into slm's config `values` (in place).

    A setting you set yourself (`explicit`, by default read from Hydra) is kept, and the JSON value it
    replaces is returned as a note for the user. No-op for a stage without a JSON config.
    """
    train, ds = values.get("train"), values.get("deepspeed")
    if not isinstance(train, dict) or not isinstance(ds, dict):
        return []
    path = ds.get("config_file")
    if not path:
        if train.get("lr_schedule") == "deepspeed":
            raise SlmError("train.lr_schedule=deepspeed takes the schedule from the scheduler block of "
                           "deepspeed.config_file, and no deepspeed.config_file is set; give one, or choose "
                           "train.lr_schedule=cosine|linear|constant.")
        return []
    user = read_user_config(path)
    if explicit is None:
        explicit = explicit_keys(values)
    notes: list[str] = []
    # The schedule: the JSON's scheduler block drives the learning rate unless you chose one for slm.
    own_schedule = "train.lr_schedule" in explicit and train.get("lr_schedule") != "deepspeed"
    if "scheduler" in user:
        if own_schedule:
            notes.append(f"train.lr_schedule={train['lr_schedule']} (yours) replaces the scheduler block "
                         f"({user['scheduler'].get('type')}) of {path}")
        else:
            train["lr_schedule"] = "deepspeed"
    elif train.get("lr_schedule") == "deepspeed":
        raise SlmError(f"train.lr_schedule=deepspeed takes the schedule from the scheduler block of {path}, and it "
                       'has none; add one (e.g. "scheduler": {"type": "WarmupLR"}) or choose train.lr_schedule=cosine.')
    for slm_key, ds_key, convert in SHARED:
        raw = _get(user, ds_key)
        if raw is _MISSING or raw == "auto" or (ds_key.startswith("scheduler.") and own_schedule):
            continue
        try:
            value = convert(raw)
        except ValueError as exc:
            raise SlmError(f"deepspeed.config_file={path}: {ds_key}={raw!r}: {exc}.") from None
        current = _get(values, slm_key)
        if slm_key not in explicit:
            _set_path(values, slm_key, value)
        elif value != current:
            notes.append(f"{slm_key}={current} (yours) replaces {ds_key}={raw!r} of {path}")
    # A JSON offload the stage you chose cannot run is dropped, not turned into a config error about a
    # key you never set: DeepSpeed offloads parameters only under ZeRO-3, the optimizer from ZeRO-1.
    stage = ds.get("zero_stage")
    for key, needs, ok in (("offload_param", "ZeRO-3", stage == 3), ("offload_optimizer", "ZeRO >= 1", stage != 0)):
        if not ok and ds.get(key) != "none" and f"deepspeed.{key}" not in explicit:
            ds[key] = "none"
            notes.append(f"zero_optimization.{key} of {path} is not used: it needs {needs}, and deepspeed.zero_stage={stage}")
    return notes


def hidden_size_of(model_config: Any) -> int | None:
    """The width DeepSpeed's "auto" bucket sizes scale with, found as transformers' Trainer finds it."""
    for cfg in (model_config, getattr(model_config, "text_config", None)):
        if cfg is None:
            continue
        if isinstance(getattr(cfg, "hidden_size", None), int):
            return cfg.hidden_size
        if getattr(cfg, "hidden_sizes", None):
            return max(cfg.hidden_sizes)
    return None


def build_ds_config(train, ds, world_size: int, hidden_size: int | None = None) -> dict:
    """DeepSpeed config for one training stage.

    slm declares an optimizer only when optimizer state is offloaded (DeepSpeed then uses its CPU
    Adam); otherwise the caller passes a torch AdamW, which needs no compiled op. A user JSON's
    optimizer block is kept, with `torch_adam` when not offloaded (`merge_user_config`).
    `train` and `ds` are the config in effect, the JSON's settings already taken in by
    `adopt_user_config`; `hidden_size` fills the JSON's "auto" bucket sizes.
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
        config = merge_user_config(config, ds.config_file, train, hidden_size)
    elif train.lr_schedule == "deepspeed":
        raise SlmError("train.lr_schedule=deepspeed needs deepspeed.config_file with a scheduler block.")
    return config


# Keys of slm's own dict that replace the JSON's value even when it is concrete: the shared settings
# (the JSON's value already reached slm's config through adopt_user_config, unless you set your own),
# the batch size derived from them, and the overflow check train.nonfinite relies on.
_OWNED = {ds_key for _, ds_key, _ in SHARED} | {"train_batch_size", "bf16.check_grad_overflow"}


def merge_user_config(ours: dict, path: str, train, hidden_size: int | None = None) -> dict:
    """Lay slm's config `ours` over the user's DeepSpeed JSON at `path` and fill its "auto" values."""
    user = read_user_config(path)
    given = _get(user, "train_batch_size")
    if given not in (_MISSING, "auto") and given != ours["train_batch_size"]:
        raise SlmError(
            f"deepspeed.config_file={path}: train_batch_size={given!r}, but train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x processes = {ours['train_batch_size']}. Set it to \"auto\" (slm fills it), "
            "or make train.micro_batch_size / train.grad_accum multiply to it."
        )
    merged = copy.deepcopy(user)
    for key, value in _flatten(ours).items():
        if key in _OWNED or _get(merged, key) in (_MISSING, "auto"):
            _set_path(merged, key, value)
    for name in ("offload_optimizer", "offload_param"):  # slm's "none" has no block of its own to lay over the JSON's
        block = merged.get("zero_optimization", {}).get(name)
        if isinstance(block, dict):
            block["device"] = ours["zero_optimization"].get(name, {}).get("device", "none")
    offloaded = ours["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
    if "optimizer" in merged:
        params = merged["optimizer"].setdefault("params", {})
        params["lr"], params["weight_decay"] = train.lr, train.weight_decay
        if params.get("betas") == "auto":
            params["betas"] = list(ADAM_BETAS)
        if params.get("eps") == "auto":
            params["eps"] = ADAM_EPS
        if not offloaded:
            # torch's AdamW; without this DeepSpeed builds its fused Adam (minutes of JIT compiling on a CPU)
            params.setdefault("torch_adam", True)
    if train.lr_schedule == "deepspeed":
        _fill_scheduler(merged["scheduler"], train)
    else:
        merged.pop("scheduler", None)  # train.lr_schedule is yours: slm's schedule drives the learning rate
    _fill_size_autos(merged, hidden_size, path)
    if _get(merged, "fp16.enabled") == "auto":
        merged["fp16"]["enabled"] = False
    if _get(merged, "zero_optimization.stage3_gather_16bit_weights_on_model_save") == "auto":
        merged["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    left = sorted(k for k, v in _flatten(merged).items() if v == "auto")
    if left:
        raise SlmError(f'deepspeed.config_file={path}: slm has no value to fill "auto" in {", ".join(left)}; '
                       "put a value there.")
    return merged


def _fill_scheduler(scheduler: dict, train) -> None:
    """Fill a warm-up schedule from slm's config: warm-up, peak / final learning rate, length."""
    params = scheduler.setdefault("params", {})
    kind = scheduler["type"]
    # deepspeed >= 0.19.6 refuses warmup_num_steps <= 0 (transformers fills max(1, warmup) too)
    params["warmup_num_steps"] = max(1, train.warmup_steps)
    if kind in ("WarmupLR", "WarmupDecayLR"):
        params["warmup_max_lr"] = train.lr
        if params.get("warmup_min_lr", "auto") == "auto":
            params["warmup_min_lr"] = 0.0
    if kind in ("WarmupDecayLR", "WarmupCosineLR") and params.get("total_num_steps", "auto") == "auto":
        params["total_num_steps"] = train.max_steps
    if kind == "WarmupCosineLR":
        params["cos_min_ratio"] = train.min_lr_ratio
        if params.get("warmup_min_ratio") == "auto":
            params["warmup_min_ratio"] = 0.0


def _fill_size_autos(config: dict, hidden_size: int | None, path: str) -> None:
    """ZeRO bucket sizes marked "auto", from the model's width (transformers' trainer_config_finalize)."""
    zero = config.get("zero_optimization") or {}
    # Filled at any stage, so the recorded config holds no "auto" (DeepSpeed itself would quietly read "auto"
    # in these keys as its own default, whatever the model's width).
    fills = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    wanted = [k for k in fills if zero.get(k) == "auto"]
    if wanted and hidden_size is None:
        raise SlmError(f'deepspeed.config_file={path}: "auto" in zero_optimization.{", zero_optimization.".join(wanted)} '
                       "scales with the model's hidden_size, which its config does not give; put numbers there.")
    for k in wanted:
        zero[k] = fills[k](hidden_size)


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
