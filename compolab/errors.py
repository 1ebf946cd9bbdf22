"""The kit's exceptions: each carries one line that tells the user what to fix.

The command-line interface prints ``compolab: error: <message>`` and exits with status 2 for any
:class:`CompolabError`, without a traceback.

A library message names the *field* it is about (an argument or config field of the Python API)
in backticks, e.g. ```out` runs/a is a file, not a folder``; :meth:`CompolabError.for_flags`
rewrites each backticked field as the command-line flag that sets it (``--out``; ``compolab.cli``
reads the pairs off its parser), so the library never spells a flag and the CLI never re-words a
message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["CompolabError", "ConfigError", "DataNotFoundError", "TrainingDiverged", "field_names"]

_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


def field_names(message: str) -> list[str]:
    """The backticked fields of a message, in order.

    Examples:
        >>> field_names("`out` runs/a is a file; pass `resume` to continue")
        ['out', 'resume']
    """
    return _FIELD.findall(message)


class CompolabError(Exception):
    """Base class of the kit's user-facing errors."""

    @property
    def field(self) -> str | None:
        """The first field the message names (None if it names none)."""
        names = field_names(str(self))
        return names[0] if names else None

    def for_flags(self, flags: Mapping[str, str]) -> str:
        """The message with each backticked field that has a flag in ``flags`` written as that flag
        (a field without one keeps its backticks).

        Examples:
            >>> ConfigError("`num_tasks` must be >= 1, got 0").for_flags({"num_tasks": "--tasks"})
            '--tasks must be >= 1, got 0'
            >>> ConfigError("`accumulate` must be > 0").for_flags({})
            '`accumulate` must be > 0'
        """
        return _FIELD.sub(lambda m: flags.get(m[1], m[0]), str(self))


class ConfigError(CompolabError, ValueError):
    """A configuration field or argument has a bad value; the message names the field."""


class DataNotFoundError(CompolabError, FileNotFoundError):
    """A dataset is not where it should be; the message says where its files go."""


class TrainingDiverged(CompolabError, FloatingPointError):
    """A loss became NaN or infinite; training stops and nothing of the current task is saved."""
