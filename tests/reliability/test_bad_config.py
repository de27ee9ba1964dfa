"""Bad config: every numeric field of every stage with NaN, infinity and each value its range
refuses; misspelt keys and group options; recipe overrides outside the allow-list.

Each ends with exit 2 and one message naming the field, the value and what is allowed, before
Hydra makes a run folder: nothing is left behind. The field list is generated from the schemas, so
a new field is covered (or, without a declared range, fails `test_every_numeric_field_declares_its_range`).
The big parametrized set calls the validator directly (milliseconds each); a subset per stage goes
through the real CLI in-process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from slm_cli.config import STAGE_SCHEMAS, ConfigError, validate
from slm_cli.config.precheck import check_command_line
from slm_cli.config.validate import Range, numeric_fields
from slm_cli.errors import SlmError
from slm_cli.paths import CONFIG_DIR

pytestmark = pytest.mark.reliability

NAN, INF = float("nan"), float("inf")

# What each stage needs before its config validates (the values its YAML leaves to the user).
REQUIRED = {
    "student": ["teacher.name_or_path=/models/teacher"],
    "distill": ["teacher.name_or_path=/models/teacher"],
    "quantize": ["model.name_or_path=/models/x"],
    "prune": ["model.name_or_path=/models/x"],
    "eval": ["model.name_or_path=/models/x"],
    "bench": ["artifacts=[/models/x]"],
    "report": ["artifacts=[/models/x]"],
}
# eval's model group is unset unless chosen; its fields are checked with a model chosen (and no artifact).
EVAL_WITH_MODEL = ["model=tiny-llama", "model.name_or_path=/models/x"]


@functools.lru_cache(maxsize=None)
def base_values(stage: str, with_model: bool = False) -> dict:
    """The stage's shipped config, composed by Hydra with the required values: it validates cleanly."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = EVAL_WITH_MODEL if with_model else REQUIRED.get(stage, [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=["output_dir=/tmp/unused", *overrides])
    values = OmegaConf.to_container(cfg, resolve=True)
    validate(values, STAGE_SCHEMAS[stage])
    return values


def bad_values(tp: type, rng: Range) -> list[Any]:
    """NaN, +-infinity, the values just outside each bound (zero where it is refused), and a negative one."""
    step = 1 if tp is int else 1e-3
    outside = []
    if rng.ge is not None:
        outside.append(rng.ge - step)
    if rng.gt is not None:
        outside.append(rng.gt)
    if rng.le is not None:
        outside.append(rng.le + step)
    if rng.lt is not None:
        outside.append(rng.lt)
    low = rng.ge if rng.ge is not None else rng.gt
    if low is not None and low >= 0:
        outside.append(-1)
    return [NAN, INF, -INF, *dict.fromkeys(tp(v) for v in outside)]


def _cases():
    for stage, schema in STAGE_SCHEMAS.items():
        for key, tp, rng in numeric_fields(schema):
            if rng is None:
                continue  # test_every_numeric_field_declares_its_range fails for it
            for value in bad_values(tp, rng):
                yield pytest.param(stage, key, tp, rng, value, id=f"{stage}-{key}={value}")


def _set(values: dict, key: str, value: Any) -> str:
    """Set a dotted key (a list key ending in [] gets a one-element list); return the key the message names."""
    *parents, leaf = key.replace(".<name>", ".x").split(".")
    node = values
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if leaf.endswith("[]"):
        node[leaf[:-2]] = [value]
        return f"{'.'.join([*parents, leaf[:-2]])}[0]"
    node[leaf] = value
    return ".".join([*parents, leaf])


def _nullable_text(rng: Range) -> tuple[str, str]:
    return rng.describe(False), rng.describe(True)


@pytest.mark.parametrize("stage,key,tp,rng,value", list(_cases()))
def test_every_numeric_field_refuses_nan_inf_and_out_of_range(stage, key, tp, rng, value):
    values = _deep_copy(base_values(stage, with_model=stage == "eval" and key.startswith("model.")))
    named = _set(values, key, value)
    with pytest.raises(ConfigError) as info:
        validate(values, STAGE_SCHEMAS[stage], source=f"config of `slm {stage}`")
    problems = info.value.problems
    assert len(problems) == 1, problems  # one clear problem, no cascade into cross-field checks
    (problem,) = problems
    assert problem.startswith(f"{named}={value} "), problem
    assert any(f"must be {text}" in problem for text in _nullable_text(rng)), problem
    if not math.isfinite(value):
        assert "is not a finite number" in problem


def _deep_copy(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _deep_copy(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_deep_copy(v) for v in values]
    return values


@pytest.mark.parametrize("stage", list(STAGE_SCHEMAS))
def test_every_numeric_field_declares_its_range(stage):
    """A new int/float field must say which values it takes (Annotated[int, Range(...)]); NaN is refused either way."""
    missing = [key for key, _, rng in numeric_fields(STAGE_SCHEMAS[stage]) if rng is None]
    assert not missing, f"numeric fields of `slm {stage}` without a Range: {missing}"
    for key, tp, rng in numeric_fields(STAGE_SCHEMAS[stage]):
        default = _default(STAGE_SCHEMAS[stage], key)
        # a word default (quant.keep_sensitive: auto) is the field's non-numeric choice, checked by its own validator
        assert default is None or isinstance(default, (list, str)) or rng.contains(default), f"{key}={default} outside {rng.describe()}"


def _default(schema: type, key: str) -> Any:
    obj: Any = schema()
    for part in key.rstrip("[]").split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj


def test_the_range_check_itself_finds_a_field_without_a_range():
    @dataclasses.dataclass
    class Forgot:
        steps: int = 1
        rate: Optional[float] = None
        sizes: list[int] = dataclasses.field(default_factory=list)

        def problems(self, where: str = "") -> list[str]:
            return []

    assert [(k, r) for k, _, r in numeric_fields(Forgot)] == [("steps", None), ("rate", None), ("sizes[]", None)]
    with pytest.raises(ConfigError, match=r"rate=nan is not a finite number"):  # and NaN is still refused
        validate({"rate": NAN}, Forgot)


def test_shipped_configs_set_every_schema_key():
    """Every schema key is in the stage's YAML, so `key=value` (without +) reaches it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import yaml

    # a stage that reads trained weights (prune, quantize, eval) starts from model=hf: the sizes that only
    # build a fresh model from config (hidden_size, ...) mean nothing there and are left out on purpose
    weights_only = {f"model.{k}" for k in yaml.safe_load((CONFIG_DIR / "model" / "hf.yaml").read_text())}
    missing = []
    for stage, schema in STAGE_SCHEMAS.items():
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = OmegaConf.to_container(compose(config_name=stage))
        reads_weights = isinstance(cfg.get("model"), dict) and cfg["model"].get("name_or_path") == "???"
        missing += [
            f"{stage}: {k}" for k in _schema_keys(schema)
            if not _has(cfg, k) and not (reads_weights and k.startswith("model.") and k not in weights_only)
        ]
    assert not missing, missing


def _schema_keys(schema: type, prefix: str = "") -> list[str]:
    import typing

    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _schema_keys(tp, f"{prefix}{f.name}.")
        elif not any(dataclasses.is_dataclass(a) for a in typing.get_args(tp)):
            out.append(prefix + f.name)
        # an Optional group (eval's model) is absent until chosen with model=<option>
    return out


def _has(cfg: dict, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# --- the real CLI, a representative subset per stage ---------------------------------------------

CLI_CASES = {
    "teacher lr=nan": (["teacher", "train.lr=nan"], ["train.lr=nan is not a finite number; it must be > 0"]),
    "teacher lr=inf": (["teacher", "train.lr=inf"], ["train.lr=inf is not a finite number; it must be > 0"]),
    "teacher max_steps=0": (["teacher", "train.max_steps=0"], ["train.max_steps=0 must be >= 1"]),
    "student max_grad_norm=nan": (["student", *REQUIRED["student"], "train.max_grad_norm=nan"],
                                  ["train.max_grad_norm=nan is not a finite number; it must be >= 0"]),
    "distill kd_temperature=nan": (["distill", *REQUIRED["distill"], "distill.kd_temperature=nan"],
                                   ["distill.kd_temperature=nan is not a finite number; it must be > 0"]),
    "distill gen_top_p=0": (["distill", *REQUIRED["distill"], "distill.gen_top_p=0.0"], ["distill.gen_top_p=0.0 must be in (0, 1]"]),
    "prune target_params=nan": (["prune", *REQUIRED["prune"], "prune.target_params=nan"],
                                ["prune.target_params=nan is not a finite number; it must be >= 1 or null"]),
    "prune target_params=inf": (["prune", *REQUIRED["prune"], "prune.target_params=inf"],
                                ["prune.target_params=inf is not a finite number; it must be >= 1 or null"]),
    "prune keep_ffn=-0.5": (["prune", *REQUIRED["prune"], "prune.keep_ffn=-0.5"], ["prune.keep_ffn=-0.5 must be in (0, 1] or null"]),
    "quantize window=0": (["quantize", *REQUIRED["quantize"], "eval.window=0"], ["eval.window=0 must be >= 2"]),
    "eval batch_size=-1": (["eval", *REQUIRED["eval"], "eval.batch_size=-1"], ["eval.batch_size=-1 must be >= 1"]),
    "bench repeats=0": (["bench", *REQUIRED["bench"], "bench.repeats=0"], ["bench.repeats=0 must be >= 1"]),
    "bench with bare folder names": (["bench", "/models/a", "/models/b", "bench.warmup=-1"], ["bench.warmup=-1 must be >= 0"]),
    "bench a list entry=nan": (["bench", *REQUIRED["bench"], "bench.prefill_seq_lens=[128,nan]"],
                               ["bench.prefill_seq_lens[1]=nan is not a finite number; it must be >= 1"]),
    "misspelt key without +": (["teacher", "train.max_step=5"],
                               ["unknown key 'train.max_step'; did you mean train.max_steps? (valid keys here: max_steps,"]),
    "misspelt group option": (["teacher", "model=tiny-lama"],
                              ["model=tiny-lama: no such option in group model; did you mean tiny-llama? (options: hf,"]),
    "misspelt group name": (["teacher", "modle=tiny-llama"], ["unknown key 'modle'; did you mean model?"]),
    "misspelt first part of a key": (["teacher", "trian.lr=0.1"], ["unknown key 'trian.lr'; did you mean train.lr?"]),
    "a field the chosen option has not": (["eval", *REQUIRED["eval"], "model.hidden_size=8"],
                                          ["unknown key 'model.hidden_size' (valid keys here: name_or_path, arch, tokenizer, dtype, trust_remote_code)"]),
    "+ on a key that exists": (["teacher", "+train.lr=0.1"], ["+train.lr=0.1: train.lr is already in the config; set it without the +"]),
    "every problem at once": (["teacher", "train.max_step=5", "model=tiny-lama", "train.lr=nan"],
                              ["3 problem(s)", "unknown key 'train.max_step'", "model=tiny-lama: no such option",
                               "train.lr=nan is not a finite number"]),
    "a sweep value (-m)": (["teacher", "-m", "train.lr=1e-3,nan", "model=tiny-llama,tiny-lama"],
                           ["train.lr=nan is not a finite number", "model=tiny-lama: no such option in group model"]),
    "a stage preset (--config-dir)": (["teacher", "recipe=tiny-zero2-offload", "train.lr=-1"], ["train.lr=-1.0 must be > 0"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_before_anything_is_written(slm, tmp_path, capsys, record_message, case):
    args, fragments = CLI_CASES[case]
    rc = slm(*args, f"output_dir={tmp_path / 'out'}")
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert rc == 2, err[-2000:]
    assert err.startswith("slm error:") and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in err, err[-2000:]
    # no artifact, .work or .lock, and no Hydra run folder (outputs/...) in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "train.lr=1e-3,2e-3", "model=tiny-llama,tiny-qwen3"],
        ["-m", "train.max_steps=range(1,3)", "train.lr=interval(0.001,0.01)"],
        ["hydra.mode=MULTIRUN", "train.lr=1e-3,2e-3"],
        ["hydra.run.dir=/tmp/slm-run", "train.lr=2e-3"],
        ["train.lora.enabled=true"],
        ["--cfg", "job", "train.lr=nan"],  # --cfg shows the config; values are checked when a run starts
        ["--help"],
    ],
    ids=["multirun sweep", "range and interval sweeps", "hydra.mode=MULTIRUN", "hydra.run.dir", "a nested key", "--cfg job", "--help"],
)
def test_valid_command_lines_pass_the_check(args):
    """Hydra's grammar keeps working: the check composes exactly what @hydra.main will."""
    check_command_line("teacher", args, STAGE_SCHEMAS["teacher"])


def test_cfg_job_still_names_a_misspelt_key(slm, tmp_path, capsys):
    assert slm("teacher", "--cfg", "job", "train.max_step=5") == 2
    assert "did you mean train.max_steps?" in capsys.readouterr().err


# --- recipes: overrides pass an allow-list ----------------------------------------------------------


def _recipe(tmp_path: Path, overrides: list[str], stage: str = "teacher") -> Path:
    path = tmp_path / "theirs.yaml"
    path.write_text(yaml.safe_dump({"output_root": str(tmp_path / "runs"), "stages": [
        {"name": "a", "stage": stage, "overrides": overrides}]}))
    return path


def _evil_yaml(tmp_path: Path) -> Path:
    """A config file outside configs/ that would run code through a Hydra callback if loaded."""
    evil = tmp_path / "evil.yaml"
    evil.write_text("# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: shutil.copy\n"
                    f"      src: {evil}\n      dst: {tmp_path / 'pwned'}\n")
    return evil


REFUSED = {
    "++hydra={callbacks: ...}": (lambda t: "++hydra={callbacks: {x: {_target_: shutil.copy, src: a, dst: b}}}",
                                 "recipes may not add Hydra callbacks"),
    "+hydra.callbacks...": (lambda t: "+hydra.callbacks.x._target_=pathlib.Path.write_text", "recipes may not add Hydra callbacks"),
    "hydra/callbacks group": (lambda t: "hydra/callbacks=x", "recipes may not add Hydra callbacks"),
    "hydra.searchpath": (lambda t: f"hydra.searchpath=[file://{t}]", "recipes may not add Hydra callbacks or set other hydra.* keys"),
    "hydra.job_logging (logging factories)": (lambda t: "hydra.job_logging.root.level=INFO", "set other hydra.* keys"),
    "--config-dir": (lambda t: f"--config-dir={t}", "command-line flags (--config-dir, --config-name, -m, --cfg, ...) are not allowed"),
    "--config-name": (lambda t: "--config-name=evil", "command-line flags"),
    "a group option outside configs/": (lambda t: f"model=../../../../../../..{_evil_yaml(t).with_suffix('')}",
                                        "not a shipped option of group model"),
    "a preset outside recipes/": (lambda t: "recipe=../../x", "no such preset for slm teacher"),
    "a package override": (lambda t: "model@_global_=tiny-llama", "is not a config key"),
    "a key the stage does not have": (lambda t: "+train.callbacks=x", "train.callbacks is not a key of the `slm teacher` config"),
    "trust_remote_code": (lambda t: "model.trust_remote_code=true", "a recipe may not turn on model.trust_remote_code"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_recipe_override_outside_the_allow_list_is_refused(tmp_path, case):
    from slm_cli.pipeline import load_recipe

    make, fragment = REFUSED[case]
    override = make(tmp_path)
    path = _recipe(tmp_path, [override])
    with pytest.raises(SlmError) as info:
        load_recipe(path, {"teacher", "student", "distill", "prune", "quantize", "eval", "bench"})
    msg = str(info.value)
    assert f"in recipe {path}" in msg and "stages[0] (a, slm teacher)" in msg and repr(override) in msg, msg
    assert fragment in msg, msg


@pytest.mark.parametrize(
    "stage,override",
    [("teacher", "model=tiny-llama"), ("teacher", "train.lr=1e-4"), ("teacher", "+train.lora.r=4"), ("teacher", "~train.lora"),
     ("teacher", "hydra.verbose=true"), ("teacher", "recipe=tiny-zero2-offload"), ("student", "student.layers=[0,1]"),
     ("distill", "distill=on_policy"), ("quantize", "quant=fp8_block"), ("prune", "prune.keep_ffn=0.5"),
     ("eval", "model=smollm2-135m-instruct"), ("teacher", "model.trust_remote_code=false")],
)
def test_recipe_overrides_inside_the_allow_list_pass(stage, override):
    from slm_cli.pipeline import override_refusal

    assert override_refusal(stage, override) is None


@pytest.mark.parametrize("key", ["--config-dir", "hydra.searchpath", "+hydra.callbacks.x.src", "train.lr.x"])
def test_recipe_input_keys_pass_the_same_allow_list(tmp_path, key):
    """An input becomes `<key>=<artifact folder>` on the stage's line, so its key is checked like an override."""
    from slm_cli.pipeline import load_recipe

    path = tmp_path / "theirs.yaml"
    path.write_text(yaml.safe_dump({"inputs": {"t": None}, "stages": [{"name": "a", "stage": "student", "inputs": {key: "t"}}]}))
    with pytest.raises(SlmError, match=rf"stages\[0\] \(a, slm student\): input key '{re.escape(key)}' is refused"):
        load_recipe(path, {"teacher", "student"})


def test_slm_run_refuses_a_recipe_callback_before_any_stage_runs(slm, tmp_path, capsys, record_message):
    """Before: `++hydra={callbacks: ...}` passed the `hydra.callbacks` prefix check and Hydra instantiated it."""
    marker, src = tmp_path / "pwned", tmp_path / "src.txt"
    src.write_text("x")
    path = _recipe(tmp_path, [f"++hydra={{callbacks: {{x: {{_target_: shutil.copy, src: '{src}', dst: '{marker}'}}}}}}"])
    assert slm("run", f"recipe={path}") == 2
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert "recipes may not add Hydra callbacks" in err and str(path) in err
    assert not marker.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["src.txt", "theirs.yaml"]  # no runs/, no Hydra outputs/
