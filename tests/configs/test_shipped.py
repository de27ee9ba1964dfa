"""Every shipped config group option and every recipe composes with Hydra and validates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from slm_cli.config import STAGE_SCHEMAS, validate
from slm_cli.paths import CONFIG_DIR, RECIPE_DIR
from slm_cli.pipeline import is_pipeline, load_recipe

# values that configs leave for the user to fill (`???`)
REQUIRED = {"model": ["model.name_or_path=/models/x"], "data": ["data.source=/data/train.jsonl"]}
STAGE_REQUIRED = {
    "student": ["teacher.name_or_path=/models/teacher"],
    "distill": ["teacher.name_or_path=/models/teacher"],
    "quantize": ["model.name_or_path=/models/x"],
    "prune": ["model.name_or_path=/models/x"],
    "eval": ["model.name_or_path=/models/x"],
}


def _groups(stage: str) -> list[str]:
    """The config groups a stage's primary config composes (its defaults list)."""
    import yaml

    defaults = yaml.safe_load((CONFIG_DIR / f"{stage}.yaml").read_text()).get("defaults", [])
    return [next(iter(d)) for d in defaults if isinstance(d, dict) and next(iter(d)) != "hydra"]


def _compose(config_dir: Path, name: str, overrides: list[str]) -> dict:
    # as `slm <stage> recipe=NAME` does: configs/ stays on the search path beside the recipe folder
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=name, overrides=[f"hydra.searchpath=[file://{CONFIG_DIR}]", "output_dir=/tmp/x", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def _cases():
    for stage in STAGE_SCHEMAS:
        for group in _groups(stage):
            for option in sorted((CONFIG_DIR / group).glob("*.yaml")):
                yield stage, group, option.stem


@pytest.mark.parametrize("stage,group,option", list(_cases()))
def test_group_option_composes_and_validates(stage, group, option):
    overrides = [f"{group}={option}", *REQUIRED.get(group, []), *STAGE_REQUIRED.get(stage, [])]
    values = _compose(CONFIG_DIR, stage, overrides)
    validate(values, STAGE_SCHEMAS[stage])


PIPELINES = [p for p in sorted(RECIPE_DIR.rglob("*.yaml")) if is_pipeline(p)]
PRESETS = [p for p in sorted(RECIPE_DIR.glob("*/*.yaml")) if not is_pipeline(p)]


@pytest.mark.parametrize("recipe", PIPELINES, ids=lambda p: str(p.relative_to(RECIPE_DIR)))
def test_pipeline_recipe_stages_compose_and_validate(recipe):
    from slm_cli.__main__ import STAGES

    spec = load_recipe(recipe, {s for s, (m, _) in STAGES.items() if m})
    for stage in spec.stages:
        inputs = [f"{key}=/artifacts/{src}" for key, src in stage.inputs.items()]
        values = _compose(CONFIG_DIR, stage.stage, [*stage.overrides, *inputs])
        validate(values, STAGE_SCHEMAS[stage.stage])


@pytest.mark.parametrize("recipe", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_stage_recipe_composes_and_validates(recipe):
    stage = recipe.parent.name
    if stage not in STAGE_SCHEMAS:
        pytest.skip(f"stage {stage} is validated by its own tests")
    overrides = ["model.name_or_path=/models/x"] if "override /model: hf" in recipe.read_text() else []
    overrides += STAGE_REQUIRED.get(stage, [])
    values = _compose(recipe.parent, recipe.stem, overrides)
    validate(values, STAGE_SCHEMAS[stage])


def test_every_primary_config_starts_with_its_command():
    for path in CONFIG_DIR.glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path} must start with a comment showing the command that runs it"


# Spellings retired when every stage took one name per role (issue #13): the model a stage reads was
# `model_path` (prune, quantize), `artifact=` (eval) and `student.path` (distill); the teacher was `teacher.path`.
RETIRED = ("model_path", "teacher.path", "student.path", " artifact=")


def test_one_name_per_role():
    """Every stage that reads a model reads `model.name_or_path`; every stage that learns from a teacher reads
    `teacher.name_or_path`; no shipped config, recipe, README line or field comment uses another spelling."""
    import dataclasses

    from slm_cli.config.schema import ModelConfig

    reads_model = {"teacher", "student", "distill", "prune", "quantize", "eval"}
    for stage, schema in STAGE_SCHEMAS.items():
        fields = {f.name: f for f in dataclasses.fields(schema)}
        if stage in reads_model:
            assert "model" in fields, stage
            model = fields["model"]
            default = model.default_factory() if model.default_factory is not dataclasses.MISSING else model.default
            assert isinstance(default, ModelConfig), stage
        if "teacher" in fields:
            teacher = fields["teacher"].default_factory()
            assert hasattr(teacher, "name_or_path") and not hasattr(teacher, "path"), stage
        assert not {"model_path", "artifact", "student"} & set(fields) or stage == "student", (stage, sorted(fields))
    root = CONFIG_DIR.parent
    texts = [*CONFIG_DIR.rglob("*.yaml"), *RECIPE_DIR.rglob("*.yaml"), root / "README.md",
             root / "slm_cli" / "config" / "schema.py"]
    for path in texts:
        if not path.is_file():
            continue
        text = path.read_text()
        for old in RETIRED:
            assert old not in text.replace("resolve_model_path", ""), f"{path} still says {old.strip()!r}"


@pytest.mark.parametrize("stage", sorted(STAGE_SCHEMAS))
def test_stage_help_says_how_to_run_it(slm, stage, capsys):
    """`slm <stage> --help` names the ways in: overrides, --config/recipe=, --cfg job, -m, and slm cp."""
    assert slm(stage, "--help") == 0
    out = capsys.readouterr().out
    lines = (f"slm {stage} [key=value ...]", f"slm {stage} --config FILE.yaml", "recipe=NAME|FILE.yaml",
             f"slm {stage} --cfg job", f"slm {stage} -m key=a,b", f"slm cp {stage} FILE.yaml")
    if stage == "run":  # a pipeline: recipe= or --config picks it, and slm cp copies a pipeline
        lines = ("slm run recipe=NAME|FILE.yaml", "--config FILE.yaml", "slm run --config FILE.yaml --cfg job",
                 "slm cp quickstart FILE.yaml")
    for line in lines:
        assert line in out, (stage, line)
    assert "name_or_path" in out or stage in ("bench", "report", "run")  # the config itself follows
