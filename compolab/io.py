"""Safe files: atomic writes, checked reads, an exclusive folder lock and named kill points.

* **Writes** (:func:`atomic_write`, :func:`write_json`, :func:`write_safetensors`): the content
  goes to a temporary file ``.<stem>.tmp<pid><suffix>`` in the same folder, is flushed to disk
  (``fsync``), given the usual permissions (``0666 & ~umask``, like any new file), renamed over
  the target with ``os.replace`` (atomic on POSIX) and the folder is fsynced. A killed process
  leaves the old file or the new one, never half of one; only a stray temporary, which
  :func:`clean_temporaries` removes.
* **Reads** (:func:`read_json`): a missing, unreadable or malformed file is one
  :class:`~compolab.errors.CompolabError` naming it, never a traceback.
* **Lock** (:class:`FolderLock`): an OS lock (``flock``) on ``<folder>/.lock``, held while a run
  writes into the folder; a second writer is refused at once.
* **Kill points** (:func:`fault`): ``COMPOLAB_FAULT=<point>[@<n>]`` makes the process SIGKILL
  itself the n-th time (default: the first) it reaches ``<point>``. Every atomic write passes
  ``<file name>:partial`` (half the temporary written), ``<file name>:written`` (the temporary
  complete and fsynced, not yet renamed) and ``<file name>:replaced`` (renamed, folder not yet
  fsynced); :mod:`compolab.run` adds the points of a task. The fault-injection tests kill a run at
  each of them and check that ``--resume`` gives identical numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from compolab.errors import CompolabError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "WRITE_STAGES",
    "atomic_write",
    "write_json",
    "write_safetensors",
    "read_safetensors",
    "read_json",
    "file_sha256",
    "canonical_json",
    "clean_temporaries",
    "is_temporary",
    "FolderLock",
    "fault",
]

#: The kill points of every atomic write, in order: ``<file name>:<stage>``.
WRITE_STAGES = ("partial", "written", "replaced")
_TEMPORARY = re.compile(r"^\..+\.tmp\d+(\.[A-Za-z0-9]+)?$")
_hits: dict[str, int] = {}


def fault(point: str) -> None:
    """SIGKILL this process at ``point`` when ``$COMPOLAB_FAULT`` names it (fault-injection tests).

    ``COMPOLAB_FAULT=<point>@<n>`` kills at the n-th time the point is reached. Does nothing
    (one dictionary look-up) when the variable is unset.
    """
    if _faulting(point):
        os.kill(os.getpid(), signal.SIGKILL)


def _faulting(point: str) -> bool:
    """Count a pass through ``point``; True when ``$COMPOLAB_FAULT`` says to die on this one."""
    wanted = os.environ.get("COMPOLAB_FAULT")
    if not wanted:
        return False
    name, _, nth = wanted.partition("@")
    if name != point:
        return False
    _hits[point] = _hits.get(point, 0) + 1
    return _hits[point] == int(nth or 1)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


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
        if _faulting(f"{path.name}:partial"):
            os.truncate(tmp, tmp.stat().st_size // 2)  # what a kill in the middle of the write leaves
            os.kill(os.getpid(), signal.SIGKILL)
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fault(f"{path.name}:written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fault(f"{path.name}:replaced")
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def read_safetensors(
    path: str | Path, *, what: str, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, metadata)`` of a file :func:`write_safetensors` wrote with the kit's JSON metadata
    (the ``"compolab"`` entry of the header, ``{}`` when absent).

    Raises:
        CompolabError: ``cannot read <what> from <path>: ...`` for a missing or damaged file.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = json.loads((f.metadata() or {}).get("compolab", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors raises several types (SafetensorError, OSError, ...)
        raise CompolabError(f"cannot read {what} from {path}: {e}") from e
    return tensors, meta


def read_json(path: str | Path, *, what: str = "file", kind: type = dict) -> object:
    """The JSON content of ``path``, which must be a ``kind`` (an object by default).

    Raises:
        CompolabError: One line naming the file: missing, unreadable, not JSON, or not a ``kind``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompolabError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CompolabError(f"cannot read {what} {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CompolabError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(data, kind):
        expected = "a JSON object" if kind is dict else f"a JSON {kind.__name__}"
        raise CompolabError(f"{what} {path} must hold {expected}, not a {type(data).__name__}")
    return data


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(data: object) -> bytes:
    """The bytes that a hash of JSON data covers: sorted keys, no spaces, ASCII.

    Examples:
        >>> canonical_json({"b": [1, 2.5], "a": "θ"})
        b'{"a":"\\\\u03b8","b":[1,2.5]}'
    """
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def clean_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries that killed :func:`atomic_write` calls left in ``folder``; returns them.

    Call it only while no other process writes into ``folder`` (under its :class:`FolderLock`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and _TEMPORARY.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def is_temporary(name: str) -> bool:
    """True for the name of an :func:`atomic_write` temporary."""
    return bool(_TEMPORARY.match(name))


class FolderLock:
    """An exclusive OS lock on ``<folder>/.lock`` (``flock``), released on :meth:`release` or exit.

    The lock belongs to the open file: it is released when the process ends, however it ends, so
    a killed run never leaves a stale lock behind.

    Raises:
        CompolabError: If another process holds the lock, or the lock file cannot be created.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path) -> None:
        import fcntl

        self.path = Path(folder) / self.NAME
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as e:
            raise CompolabError(f"cannot lock {folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise CompolabError(f"another run holds {folder} (locked); wait for it or choose another "
                                "`out`") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
