"""Atomic writes: every file the kit writes appears whole or not at all.

One writer for every file format: the content goes to a temporary file in the same folder, is
flushed to disk (``fsync``), then renamed over the target with ``os.replace`` (atomic on POSIX
and Windows). A killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["atomic_write", "write_json", "write_safetensors"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path next to ``path``, fsync it, rename it to ``path``.

    The temporary name keeps ``path``'s suffix (writers such as ``numpy.save`` add one otherwise).

    Args:
        path: The target file; its folder must exist.
        write: Writes the whole content to the path it is given.

    Returns:
        ``path``.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = atomic_write(folder / "a.txt", lambda p: p.write_text("hi"))
        >>> (folder / "a.txt").read_text(), sorted(q.name for q in folder.iterdir())
        ('hi', ['a.txt'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, data: object, *, indent: int | None = 2, ensure_ascii: bool = True) -> Path:
    """Write ``data`` as JSON (plus a final newline), atomically."""
    text = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + "\n"
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write named tensors (detached, contiguous, on the CPU) as a safetensors file, atomically."""
    from safetensors.torch import save_file  # torch only when tensors are written

    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata) if metadata is not None else None
    return atomic_write(path, lambda p: save_file(state, str(p), metadata=meta))
