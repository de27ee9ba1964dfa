"""Every shipped config group option and every recipe composes with Hydra and validates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from slm_cli.config import STAGE_SCHEMAS, validate
from slm_cli.paths import CONFIG_DIR, RECIPE_DIR

# values that configs leave for the user to fill (`???`)
REQUIRED = {"model": ["model.name_or_path=/models/x"], "data": ["data.source=/data/train.jsonl"]}
STAGE_REQUIRED = {"student": ["teacher.path=/models/teacher"], "distill": ["teacher.path=/models/teacher"]}


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


@pytest.mark.parametrize("recipe", sorted(RECIPE_DIR.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
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
