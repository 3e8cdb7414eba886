"""The one error type a user can act on; stdlib only, so that checking a config imports nothing heavy."""


class StageError(Exception):
    """An error the user can act on: the message names the file or field and the fix."""
