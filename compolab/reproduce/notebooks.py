"""The notebook jobs of ``compolab reproduce``: execution by ``jupyter nbconvert``, the key that
says whether a notebook must run again, and the record of each one's key and wall time."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from compolab.errors import CompolabError
from compolab.io import read_json, write_json

__all__ = ["job_notebook", "notebook_key", "notebook_record", "record_notebook"]

#: The kit's sources: a notebook runs again when any of them changes.
_KIT = Path(__file__).resolve().parents[1]
#: The record of the notebooks run into a cache, ``name -> {"key", "seconds"}``.
_RECORD = "notebooks.json"


def notebook_key(path: Path, out: str) -> str:
    """Hash of a notebook's code, of the kit's sources and of the figures folder."""
    h = hashlib.sha256(str(Path(out).resolve()).encode())
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    h.update("".join("".join(c["source"]) for c in cells if c["cell_type"] == "code").encode())
    for src in sorted(_KIT.rglob("*.py")):
        h.update(src.read_bytes())
    return h.hexdigest()


def notebook_record(cache: str | Path) -> dict:
    """The record of the notebooks run with this cache (empty when none ran)."""
    path = Path(cache) / _RECORD
    return read_json(path, what="notebook record") if path.exists() else {}


def record_notebook(cache: str | Path, name: str, path: str, key: str, seconds: float) -> None:
    """Remember a notebook's key and wall time in the cache, and the time in the notebook's own
    metadata (``compolab.seconds``): a fresh clone schedules the longest notebooks first."""
    import nbformat

    seconds = round(seconds, 1)
    record = notebook_record(cache)
    record[name] = {"key": key, "seconds": seconds}
    Path(cache).mkdir(parents=True, exist_ok=True)
    write_json(Path(cache) / _RECORD, record)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["compolab"] = {"seconds": seconds}
    nbformat.write(nb, path)


def job_notebook(path: str, figures: str, key: str = "", timeout: int = 1800) -> None:
    """Execute a notebook in place (inline figures embedded; ``savefig`` writes to ``figures``).

    Raises:
        CompolabError: If a cell fails (the last lines of nbconvert's report).
    """
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kit's style picks inline
    env.update(COMPOLAB_FIGURES_DIR=figures, TQDM_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
           f"--ExecutePreprocessor.timeout={timeout}", path]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in done.stderr.splitlines()]
        raise CompolabError(f"notebook {path} failed: {' | '.join([x for x in lines if x][-2:])}")
