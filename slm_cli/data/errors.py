"""The one error type the data layer raises for problems in the user's data or data config."""

from slm_cli.errors import SlmError


class DataError(SlmError, ValueError):
    """Bad or missing data: the message names the file (and 1-based line or row) and the fix."""
