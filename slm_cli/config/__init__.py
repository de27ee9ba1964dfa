"""Config schemas and validation (standard library only: keeps the CLI instant)."""

from slm_cli.config.schema import STAGE_SCHEMAS
from slm_cli.config.validate import ConfigError, validate

__all__ = ["STAGE_SCHEMAS", "ConfigError", "validate"]
