"""User-facing errors: one clear line, never a traceback."""

from __future__ import annotations


class MedvlpError(Exception):
    """A mistake in the user's input (data, config, paths).

    The command line prints ``str(error)`` on one line and exits with status 2; the message says what is
    wrong, where (file, row, field) and what to do.
    """


class ConfigError(MedvlpError):
    """A config value that is unknown, of the wrong type or out of range."""


class DataError(MedvlpError):
    """Raw or prepared data that cannot be read as a whole (missing file, invalid JSON, too many bad records)."""
