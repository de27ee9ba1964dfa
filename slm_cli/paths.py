"""Where slm finds its shipped configs and recipes, and where it caches data (standard library only)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# configs/ and recipes/ sit beside the package in the source tree (installed editable, as `make` does).
ROOT_DIR = PACKAGE_DIR.parent
CONFIG_DIR = Path(os.environ.get("SLM_CONFIG_DIR", ROOT_DIR / "configs"))
RECIPE_DIR = Path(os.environ.get("SLM_RECIPE_DIR", ROOT_DIR / "recipes"))


def cache_dir() -> Path:
    """The one cache folder for generated data, converted models and built tokenizers (`SLM_CACHE`)."""
    return Path(os.environ.get("SLM_CACHE", Path.home() / ".cache" / "slm"))
