"""The ``compolab`` command: ``world``, ``pretrain``, ``data``, ``train``, ``compose``, ``merge``, ``stats``,
``probe``, ``bench``, ``reproduce``.

Every bad input ends with one line ``compolab: error: ...`` on stderr and exit status 2, before
any work starts; a library error names its field, and :func:`main` writes the flag that sets it.
:mod:`compolab.cli.parser` holds the parser, :mod:`compolab.cli.commands` one thin function per
sub-command.
"""

from __future__ import annotations

import sys

from compolab.cli.parser import build_parser, flags_of
from compolab.errors import CompolabError

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        args.func(args)
    except CompolabError as e:
        flags = flags_of(parser, getattr(args, "command", None))  # the flags of the sub-command that ran
        print(f"compolab: error: {e.for_flags(flags)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compolab: interrupted", file=sys.stderr)
        return 130
    return 0
