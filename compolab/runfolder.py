"""The run folder: checked before any work, held exclusively, and committed task by task.

A run folder (``compolab train --out``) holds ``config.json``, ``pool/``, ``state/``,
``results.json``, ``log.txt`` and ``.lock``. :class:`RunFolder` guards it:

* **Before any work** (:func:`check_out`, nothing created): ``--out`` must be a folder (or not
  exist yet) that can be written; a new run needs it empty (or absent), a resumed run needs its
  ``config.json`` to match. A non-empty folder without ``config.json`` is not a run and is refused.
* **Exclusive** (:meth:`RunFolder.open`): an OS lock (``flock`` on ``.lock``, see
  :class:`~compolab.io.FolderLock`) is taken before anything is written and held for the whole
  run; the checks are repeated under it, so two runs started together on one folder cannot both
  pass. The lock dies with its process: a killed run leaves no stale lock.
* **Commit protocol.** Task t only ever writes files of its own, each atomically
  (:func:`~compolab.io.atomic_write`) and never overwritten: ``pool/task_<t>.safetensors`` then
  its card ``pool/task_<t>.json``, ``state/after_<t>.safetensors`` then ``state/after_<t>.json``.
  Then the single marker, ``results.json``, is replaced atomically (:meth:`RunFolder.commit`): it
  holds the accuracy rows of the committed tasks and, under ``commit``, the sha256 of every file
  that a resume needs (the cards and the state's JSON, whose own hashes cover their tensors).
  Only after that is the previous state generation deleted. A kill at any point therefore leaves
  ``results.json`` describing the last committed task with every file it lists intact.
  :meth:`RunFolder.recover` (``--resume``) trusts ``results.json`` only: it checks the listed
  files, deletes every pool / state file it does not list (those of the uncommitted task, which is
  trained again from the same seed, so the numbers are identical) and the temporaries of killed
  writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from compolab.errors import CompolabError, ConfigError
from compolab.io import FolderLock, clean_temporaries, file_sha256, is_temporary, read_json, write_json

__all__ = ["RunFolder", "check_out", "load_results"]

#: The files of a task in ``pool/`` and ``state/``: kept on resume only when committed.
_TASK_FILE = re.compile(r"^(task|after)_\d{3,}\.(json|safetensors)$")
_SUBFOLDERS = ("pool", "state")


def _own(path: Path) -> bool:
    """Files a run may leave in a folder it has not yet used: its lock and temporaries."""
    return path.name == FolderLock.NAME or is_temporary(path.name)


def _diff_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two nested config dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff_fields(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def check_out(out: str | Path, config: dict, resume: bool) -> None:
    """Check a run folder before any work, creating nothing.

    Args:
        out: The run folder (``--out``).
        config: The run's configuration as JSON (``RunConfig.to_json()``).
        resume: Continue the run in ``out``.

    Raises:
        ConfigError: One line: ``out`` is a file, cannot be written, holds a run (and ``resume``
            is off), holds something that is not a run, holds no run or another run's config
            (``resume``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`out` {out} is a file, not a folder")
    if not out.exists():
        if resume:
            raise ConfigError(f"`resume`: {out} does not exist (no run to continue)")
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"cannot create `out` {out}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot create `out` {out}: {parent} is not writable")
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"`out` {out} is not writable")
    cfg_path = out / "config.json"
    if not resume:
        if cfg_path.exists():
            raise ConfigError(f"{out} already holds a run; pass `resume` to continue it, or another `out`")
        if any(not _own(p) for p in out.iterdir()):
            raise ConfigError(f"{out} is not empty and holds no run (no config.json); choose a new or "
                              "empty `out`")  # fmt: skip
        return
    if not cfg_path.exists():
        raise ConfigError(f"`resume`: {out} holds no run (no config.json)")
    previous = read_json(cfg_path, what="run config")
    if previous != config:
        raise ConfigError(f"`resume`: {out} was made with another config "
                          f"(fields differ: {_diff_fields(previous, config)})")  # fmt: skip


class RunFolder:
    """An open run folder: locked, recovered, committed task by task (see the module docstring).

    Use :meth:`open`; call :meth:`close` (or use it as a context manager) at the end.

    Attributes:
        root: The folder.
        results: The committed results (None before the first commit of a new run).
        discarded: Files of an uncommitted task that :meth:`open` deleted (``--resume``).
        resumed: The folder was opened with ``resume`` (and recovered).
    """

    def __init__(self, root: Path, lock: FolderLock) -> None:
        self.root = root
        self._lock = lock
        self.results: dict | None = None
        self.discarded: list[str] = []
        self.resumed = False

    @classmethod
    def open(cls, out: str | Path, config: dict, resume: bool) -> RunFolder:
        """Create (if needed) and lock ``out``, check it again under the lock, write ``config.json``
        (new run) or recover the last commit (``resume``).

        Raises:
            ConfigError: As :func:`check_out`, or if another process holds the folder.
            CompolabError: If a committed file changed or vanished (``resume``).
        """
        root = Path(out)
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create `out` {root}: {e.strerror or e}") from None
        lock = FolderLock(root)  # never removed by a run that did not get it
        folder = cls(root, lock)
        try:
            check_out(root, config, resume)
            for sub in ("", *_SUBFOLDERS):
                clean_temporaries(root / sub)
            if resume:
                folder._recover()
                folder.resumed = True
            else:
                write_json(root / "config.json", config)
        except BaseException:
            if created and not (root / "config.json").exists():
                _remove_if_empty(root)  # while still holding the lock
            lock.release()
            raise
        return folder

    def _recover(self) -> None:
        """Trust ``results.json`` only: check the files it lists, delete the task files it does not."""
        path = self.root / "results.json"
        committed: dict[str, str] = {}
        if path.exists():
            results = read_json(path, what="run results")
            commit = results.get("commit")
            rows = results.get("accuracy_matrix")
            if not isinstance(commit, dict) or not isinstance(commit.get("files"), dict) \
                    or not isinstance(rows, list):  # fmt: skip
                raise CompolabError(f"{path} has no commit record (made by an older compolab or "
                                    "edited); start a new run")  # fmt: skip
            committed = commit["files"]
            for rel, sha in committed.items():
                f = self.root / rel
                if not f.is_file() or file_sha256(f) != sha:
                    raise CompolabError(f"cannot resume: {f} changed or vanished since it was committed; "
                                        "start a new run")  # fmt: skip
            self.results = results
        for sub in _SUBFOLDERS:
            folder = self.root / sub
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if _TASK_FILE.match(f.name) and f"{sub}/{f.stem}.json" not in committed:
                    f.unlink()
                    self.discarded.append(f"{sub}/{f.name}")

    def commit(self, results: dict, add: Sequence[Path], drop: Sequence[Path] = ()) -> None:
        """Make a finished task durable: write ``results.json`` (the marker) listing the committed
        files, ``add`` included and ``drop`` left out, then delete ``drop`` and its tensors.

        Args:
            results: The results with the new task's row.
            add: The JSON files the task wrote (its card, its state), complete on disk.
            drop: JSON files the task superseded (the previous state).
        """
        previous = dict((self.results or {}).get("commit", {}).get("files", {}))
        for p in drop:
            previous.pop(self._rel(p), None)
        previous.update({self._rel(p): file_sha256(p) for p in add})
        results["commit"] = {"files": dict(sorted(previous.items()))}
        write_json(self.root / "results.json", results)
        self.results = results
        for p in drop:
            for f in (p, p.with_suffix(".safetensors")):
                f.unlink(missing_ok=True)

    def write_results(self, results: dict) -> None:
        """Rewrite ``results.json`` (e.g. the final accuracy), keeping the commit record."""
        results["commit"] = (self.results or {}).get("commit", {"files": {}})
        write_json(self.root / "results.json", results)
        self.results = results

    def _rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def close(self) -> None:
        """Release the lock."""
        self._lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remove_if_empty(root: Path) -> None:
    """Remove a folder this run created, if it holds nothing but the run's own lock / temporaries."""
    try:
        if all(_own(p) for p in root.iterdir()):
            for p in root.iterdir():
                p.unlink(missing_ok=True)
            root.rmdir()
    except OSError:
        pass


def load_results(out: str | Path) -> dict:
    """The ``results.json`` of a run folder."""
    path = Path(out) / "results.json"
    if not path.exists():
        raise CompolabError(f"{path} not found: no run in {out}")
    return read_json(path, what="run results")
