"""Where slm finds its shipped configs and recipes, and where it caches data (standard library only)."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def _shipped(name: str) -> Path:
    """The folder `slm_cli/<name>` as installed: package data in a wheel, or in a source checkout the
    symlink `slm_cli/<name> -> ../<name>` to the top-level folder (which is what setuptools packs)."""
    folder = files("slm_cli") / name
    if not isinstance(folder, Path):  # Hydra reads configs from a directory on disk, not from a zip
        raise RuntimeError(f"slm's {name}/ is not a folder on disk ({folder}); install slm as a normal wheel, not zipped")
    return folder


CONFIG_DIR = Path(os.environ.get("SLM_CONFIG_DIR") or _shipped("configs"))
RECIPE_DIR = Path(os.environ.get("SLM_RECIPE_DIR") or _shipped("recipes"))


def cache_dir() -> Path:
    """The one cache folder for generated data, converted models and built tokenizers (`SLM_CACHE`)."""
    return Path(os.environ.get("SLM_CACHE", Path.home() / ".cache" / "slm"))
