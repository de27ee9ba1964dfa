"""Errors meant for users: printed as a clear message (no traceback) with a non-zero exit."""


class SlmError(Exception):
    """A problem the user can fix; the message says what was wrong, where, and the fix."""
