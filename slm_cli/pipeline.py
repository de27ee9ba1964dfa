"""Pipeline recipes: an ordered list of stages, each fed by the artifacts of earlier ones.

A recipe (recipes/quickstart.yaml) looks like

    output_root: runs/quickstart
    inputs: {teacher: null}            # artifacts the user may pass: slm run inputs.teacher=...
    stages:
      - name: student                  # the artifact lands in <output_root>/student
        stage: student                 # which `slm <stage>` runs it
        overrides: [model=tiny-llama-student, train.max_steps=100]
        inputs: {teacher.path: teacher}   # config key <- an earlier stage's artifact or a recipe input

Re-running is incremental. A stage's *run key* hashes its stage, overrides and the content
hashes of the artifacts it reads; the runner records each finished stage's key and its
artifact's content hash in <output_root>/pipeline.json, and skips a stage whose key and
artifact are unchanged. Editing one stage's overrides therefore re-runs that stage, and a
later stage re-runs only if an artifact it reads changed. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
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
    candidates = [Path(name), recipe_dir / f"{name}.yaml", recipe_dir / name]
    for c in candidates:
        if c.is_file():
            return c
    have = sorted(str(p.relative_to(recipe_dir).with_suffix("")) for p in recipe_dir.rglob("*.yaml") if is_pipeline(p))
    raise SlmError(f"recipe={name}: no such pipeline recipe. Pipelines shipped in {recipe_dir}: {', '.join(have)}.")


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
        raise SlmError(f"{path}: a pipeline recipe needs a non-empty `stages:` list.")
    unknown = set(data) - {"output_root", "inputs", "stages"}
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)} (valid: output_root, inputs, stages)")
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
        for o in spec.overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            if key in ("output_dir", "hydra.run.dir", *spec.inputs):
                problems.append(f"{where} ({spec.name}): override {o!r} is set by the pipeline; remove it")
            elif key.startswith("hydra.callbacks"):
                # Hydra instantiates callbacks' _target_: a recipe must not be a way to run arbitrary code.
                problems.append(f"{where} ({spec.name}): override {o!r} is refused: recipes may not add Hydra callbacks")
        seen.add(spec.name)
        stages.append(spec)
    if problems:
        raise SlmError(f"{len(problems)} problem(s) in recipe {path}:\n  - " + "\n  - ".join(problems))
    return Recipe(path=path, output_root=str(data.get("output_root") or f"runs/{path.stem}"), stages=stages, inputs=user_inputs)


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
