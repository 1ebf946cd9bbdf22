"""The kit's exceptions: each carries one line that tells the user what to fix.

The command-line interface prints ``compolab: error: <message>`` and exits with status 2 for any
:class:`CompolabError`, without a traceback.
"""

from __future__ import annotations

__all__ = ["CompolabError", "ConfigError", "DataNotFoundError", "TrainingDiverged"]


class CompolabError(Exception):
    """Base class of the kit's user-facing errors."""


class ConfigError(CompolabError, ValueError):
    """A configuration field or argument has a bad value; the message names the field."""


class DataNotFoundError(CompolabError, FileNotFoundError):
    """A dataset is not where it should be; the message says where its files go."""


class TrainingDiverged(CompolabError, FloatingPointError):
    """A loss became NaN or infinite; training stops and nothing of the current task is saved."""
