"""Pipeline recipes: an ordered list of stages, each fed by the artifacts of earlier ones.

A recipe (recipes/quickstart.yaml) looks like

    output_root: runs/quickstart
    inputs: {teacher: null}            # artifacts the user may pass: slm run inputs.teacher=...
    data: {source: arithmetic}         # the task data, named once: every stage that needs data uses it
    stages:
      - name: student                  # the artifact lands in <output_root>/student
        stage: student                 # which `slm <stage>` runs it
        overrides: [model=tiny-llama-student, train.max_steps=100]
        inputs: {teacher.name_or_path: teacher}   # config key <- an earlier stage's artifact or a recipe input

The `data:` block reaches every stage unless the stage's own overrides set the key: training and
eval stages get `data=<built-in source>` (or `data=jsonl data.source=<file>`) and the block's other
data keys, prune and quantize get `calibration.source` and `eval.source` (data_overrides). These
overrides pass the same allow-list as a stage's own and count in its run key.

Re-running is incremental. A stage's *run key* hashes its stage, overrides and the content
hashes of the artifacts it reads; the runner records each finished stage's key and its
artifact's content hash in <output_root>/pipeline.json, and skips a stage whose key and
artifact are unchanged. Editing one stage's overrides therefore re-runs that stage, and a
later stage re-runs only if an artifact it reads changed. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from slm_cli.artifacts import content_hash
from slm_cli.errors import SlmError

STATE_FILE = "pipeline.json"


@dataclass
class StageSpec:
    name: str
    stage: str
    overrides: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)  # config key -> earlier stage name or recipe input


@dataclass
class Recipe:
    path: Path
    output_root: str
    stages: list[StageSpec]
    inputs: dict[str, str | None] = field(default_factory=dict)


def find_recipe(name: str, recipe_dir: Path) -> Path:
    """`recipe=` of `slm run`: a YAML file (a value ending in .yaml or .yml, relative to the current folder),
    else a pipeline shipped in recipes/ by name (`quickstart`, `distill/sft_then_on_policy`)."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if path.is_file():
            return path
        raise SlmError(f"recipe={name}: no such file (from {Path.cwd()}). `slm cp quickstart my.yaml` writes a pipeline to edit.")
    have = sorted(p.relative_to(recipe_dir).with_suffix("").as_posix() for p in recipe_dir.rglob("*.yaml") if is_pipeline(p))
    if name in have:  # a shipped name, never a path: `recipe=../x` does not leave recipes/
        return recipe_dir / f"{name}.yaml"
    raise SlmError(f"recipe={name}: no such pipeline recipe. Pipelines shipped in {recipe_dir}: {', '.join(have)}; "
                   f"or give a file of yours: recipe=my.yaml.")


def plan(recipe: Recipe, root: Path, given: dict[str, str | None]) -> list[tuple[StageSpec, dict[str, Path | None], Path]]:
    """The stages in order, each with the folders it reads (config key -> an earlier stage's output or a
    recipe input; None for an input not given) and the folder it writes, `<root>/<name>`."""
    outputs: dict[str, Path] = {n: Path(p) for n, p in given.items() if p}
    steps = []
    for spec in recipe.stages:
        out = root / spec.name
        steps.append((spec, {key: outputs.get(src) for key, src in spec.inputs.items()}, out))
        outputs[spec.name] = out
    return steps


def stage_overrides(spec: StageSpec, sources: dict[str, Path], out: Path) -> list[str]:
    """What `slm run` passes to `slm <stage>` after the stage's own overrides: its inputs and output folder."""
    return [*spec.overrides, *(f"{k}={Path(p).resolve()}" for k, p in sources.items()), f"output_dir={out.resolve()}"]


def is_pipeline(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "stages" in data


def load_recipe(path: Path, known_stages: set[str]) -> Recipe:
    """Parse and check a pipeline recipe; every problem is reported in one error."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SlmError(f"{path} is not valid YAML: {exc}") from exc
    problems: list[str] = []
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        hint = (" It looks like one stage's config (it has a defaults list): run it with `slm <stage> --config "
                f"{path}`." if isinstance(data, dict) and "defaults" in data else "")
        raise SlmError(f"{path}: a pipeline recipe needs a non-empty `stages:` list.{hint}")
    unknown = set(data) - {"output_root", "inputs", "stages", "data"}
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)} (valid: output_root, inputs, data, stages)")
    task_data = recipe_data(data.get("data"), problems)
    user_inputs = dict(data.get("inputs") or {})
    stages: list[StageSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["stages"]):
        where = f"stages[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where} must be a mapping with name, stage, overrides, inputs")
            continue
        bad = set(raw) - {"name", "stage", "overrides", "inputs"}
        if bad:
            problems.append(f"{where}: unknown keys {sorted(bad)} (valid: name, stage, overrides, inputs)")
        spec = StageSpec(
            name=str(raw.get("name", "")), stage=str(raw.get("stage", "")),
            overrides=[str(o) for o in raw.get("overrides") or []], inputs={str(k): str(v) for k, v in (raw.get("inputs") or {}).items()},
        )
        own = list(spec.overrides)
        if not spec.name:
            problems.append(f"{where}: `name` is required")
        elif spec.name in seen:
            problems.append(f"{where}: the name {spec.name!r} is used twice")
        if spec.stage not in known_stages:
            problems.append(f"{where} ({spec.name}): stage={spec.stage!r} is not one of {', '.join(sorted(known_stages))}")
        for key, source in spec.inputs.items():
            if source not in seen and source not in user_inputs:
                problems.append(
                    f"{where} ({spec.name}): input {key}={source!r} names no earlier stage and no recipe input "
                    f"(earlier stages: {', '.join(sorted(seen)) or 'none'})"
                )
            # an input becomes `<key>=<artifact folder>` on the stage's command line: the same allow-list
            refusal = override_refusal(spec.stage, f"{key}=<artifact folder>") if spec.stage in known_stages else None
            if refusal:
                problems.append(f"{where} ({spec.name}, slm {spec.stage}): input key {key!r} is refused: {refusal}")
        for o in spec.overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            if key in ("output_dir", "hydra.run.dir", *spec.inputs):
                problems.append(f"{where} ({spec.name}): override {o!r} is set by the pipeline; remove it")
            elif spec.stage in known_stages:
                refusal = override_refusal(spec.stage, o)
                if refusal:
                    problems.append(f"{where} ({spec.name}, slm {spec.stage}): override {o!r} is refused: {refusal}")
        if task_data and spec.stage in known_stages:
            # first, so that the stage's own overrides are what a reader sees last; keys it sets are not added
            derived = data_overrides(spec.stage, task_data, own)
            for o in derived:
                refusal = override_refusal(spec.stage, o)
                if refusal:
                    problems.append(f"{where} ({spec.name}, slm {spec.stage}): data: gives {o!r}, which is refused: {refusal}")
            spec.overrides = [*derived, *own]
        seen.add(spec.name)
        stages.append(spec)
    if problems:
        raise SlmError(f"{len(problems)} problem(s) in recipe {path}:\n  - " + "\n  - ".join(problems))
    return Recipe(path=path, output_root=str(data.get("output_root") or f"runs/{path.stem}"), stages=stages, inputs=user_inputs)


def recipe_data(value, problems: list[str]) -> dict | None:
    """A recipe's top-level `data:` block as {data key: value}, or None when it has none.

    `data: arithmetic` is short for `data: {source: arithmetic}`; a mapping takes any key of the
    stages' `data` config (source, max_seq_len, train_size, ...). Problems are appended to `problems`.
    """
    import dataclasses

    from slm_cli.config.schema import DataConfig

    if value is None:
        return None
    if isinstance(value, str):
        value = {"source": value}
    if not isinstance(value, dict):
        problems.append(f"data: must be a source name or a mapping of data keys (e.g. data: {{source: arithmetic}}), not {value!r}")
        return None
    valid = [f.name for f in dataclasses.fields(DataConfig)]
    bad = sorted(set(value) - set(valid))
    if bad:
        problems.append(f"data: unknown keys {bad} (valid: {', '.join(valid)})")
    if not value.get("source") or not isinstance(value.get("source"), str):
        problems.append("data: needs `source`: the task data every stage uses (a built-in task, a corpus or a data file)")
        return None
    return {k: v for k, v in value.items() if k in valid}


def _override_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def data_overrides(stage: str, data: dict, own: list[str]) -> list[str]:
    """The overrides a recipe's `data:` block gives `slm <stage>`, less the keys the stage's own overrides set.

    A stage that trains or evaluates (its config has `data`) gets the data group of a built-in source
    (`data=arithmetic`, as a user would type it) or `data=jsonl data.source=<file>` for anything
    else, then the block's other keys as `data.<key>=...`; a stage that calibrates or measures
    perplexity (prune, quantize) gets `calibration.source` and `eval.source`.
    """
    from slm_cli.config.schema import STAGE_SCHEMAS
    from slm_cli.paths import CONFIG_DIR

    schema = STAGE_SCHEMAS.get(stage)
    if schema is None:
        return []
    mine = {o.split("=", 1)[0].lstrip("+~") for o in own}
    source = str(data["source"])
    out: list[str] = []
    if _schema_has(schema, ["data", "source"]):
        if not mine & {"data", "data.source"}:
            shipped = (CONFIG_DIR / "data" / f"{source}.yaml").is_file() and _OPTION.fullmatch(source)
            out += [f"data={source}"] if shipped else ["data=jsonl", f"data.source={source}"]
        out += [f"data.{k}={_override_value(v)}" for k, v in data.items() if k != "source" and f"data.{k}" not in mine]
    for key in ("calibration.source", "eval.source"):
        if _schema_has(schema, key.split(".")) and key not in mine:
            out.append(f"{key}={source}")
    return out


# hydra.* keys a recipe may set: nothing that names code (callbacks, launchers, sweepers, logging
# factories) or other config files (searchpath). Anything else under hydra is refused.
RECIPE_HYDRA_KEYS = ("hydra.verbose",)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def override_refusal(stage: str, override: str) -> str | None:
    """Why a recipe's override for `slm <stage>` is refused, or None when it is allowed.

    A recipe is a file someone else may have written, so its overrides pass an allow-list, not a
    block-list: a key of the stage's schema (a field, or a field of one of its groups), a shipped
    option of a config group, or one of RECIPE_HYDRA_KEYS. A block-list missed
    `++hydra={callbacks: ...}` and `--config-dir`, through which Hydra instantiates any `_target_`.
    """
    from slm_cli.config.schema import STAGE_SCHEMAS
    from slm_cli.paths import CONFIG_DIR, RECIPE_DIR

    if override.startswith("-"):
        return ("command-line flags (--config-dir, --config-name, -m, --cfg, ...) are not allowed in a recipe: "
                "they read other config files or change what runs; give key=value overrides only")
    key, sep, value = override.lstrip("+~").partition("=")
    if not sep and not override.startswith("~"):
        return "not a key=value override"
    if key in RECIPE_HYDRA_KEYS:
        return None
    if key == "hydra" or key.startswith(("hydra.", "hydra/")):
        return (f"recipes may not add Hydra callbacks or set other hydra.* keys (they can run code or read other "
                f"config files); a recipe may set `slm {stage}` config keys and {', '.join(RECIPE_HYDRA_KEYS)}")
    if not _KEY.fullmatch(key):
        return f"{key!r} is not a config key (a recipe may not use package (@) or group-path (/) overrides)"
    if key.rsplit(".", 1)[-1] == "trust_remote_code" and value.strip().lower() not in ("false", "null", ""):
        return (f"a recipe may not turn on {key} (it runs code shipped with a checkpoint); if you trust its source, "
                f"run that stage yourself: slm {stage} ... {key}=true")
    if key == "recipe":
        presets = {f.stem for f in (RECIPE_DIR / stage).glob("*.yaml")}
        return None if value in presets else f"recipe={value}: no such preset for slm {stage} (have: {', '.join(sorted(presets)) or 'none'})"
    schema = STAGE_SCHEMAS.get(stage)
    if schema is not None and not _schema_has(schema, key.split(".")):
        return f"{key} is not a key of the `slm {stage}` config (see slm {stage} --cfg job)"
    group = CONFIG_DIR / key
    if group.is_dir() and sep and not override.startswith("~"):
        # a group option names a YAML file, which may hold `# @package _global_` and a hydra section:
        # only the shipped ones, by plain name (Hydra resolves `model=../../x` outside configs/)
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if not _OPTION.fullmatch(value) or ".." in value or value not in options:
            return f"{key}={value}: not a shipped option of group {key} (options: {', '.join(options)})"
    return None


def _schema_has(schema: type, parts: list[str]) -> bool:
    import dataclasses
    import typing

    tp: object = schema
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else set()
        if part not in fields:
            return False
        tp = _unwrap(typing.get_type_hints(tp)[part])
        if typing.get_origin(tp) is dict:
            return len(parts) - i - 1 <= 1  # a mapping's entries are free-form names, one level deep
    return True


def _unwrap(tp: object) -> object:
    """The dataclass or mapping inside Optional[...] (Annotated is already stripped by get_type_hints)."""
    import dataclasses
    import typing

    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a) or typing.get_origin(a) is dict]
        return inner[0] if inner else tp
    return tp


def run_key(spec: StageSpec, input_hashes: dict[str, str]) -> str:
    payload = {"stage": spec.stage, "overrides": spec.overrides, "inputs": dict(sorted(input_hashes.items()))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_state(root: Path) -> dict:
    path = root / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(root: Path, state: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(root / STATE_FILE)


def is_done(state: dict, name: str, key: str, output: Path) -> bool:
    """True when `name` last finished with this run key and its artifact is still what it wrote."""
    entry = state.get(name)
    if not entry or entry.get("key") != key or not output.is_dir():
        return False
    return content_hash(output) == entry.get("content_hash")
