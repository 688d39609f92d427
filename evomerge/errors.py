"""One exception type for every problem a user can fix.

The CLI turns an :class:`EvomergeError` into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class EvomergeError(Exception):
    """A user-facing error: the message says what is wrong, where, and what to do."""

    exit_code = 2


class ConfigError(EvomergeError):
    """A recipe or config file is malformed or has a value out of range."""


class ModelError(EvomergeError):
    """A model directory is missing, unreadable, unsafe or incompatible."""
