"""The pool of modules on disk: one safetensors file plus one JSON card per task.

Layout of a pool folder::

    pool.json              manifest: format, θ0 fingerprint, backbone spec, benchmark description
    task_000.safetensors   the module's own tensors ("<weight name>::<role>") + the task head
    task_000.json          card: task, classes, method, style, hyper-parameters, metrics,
                           θ0 fingerprint, sha256 of the .safetensors bytes and of the card itself

Every write is atomic (:mod:`compolab.io`), tensors first and card last: a card
exists only next to a complete tensor file. The card's ``sha256`` covers the tensor file's bytes
*and* the card's own content (its canonical JSON without that field), so any later change to either
(a truncated file, an edited ``classes``) is refused. Loading checks, each with one line naming the
file: the manifest's and the card's schema, the θ0 fingerprint against the backbone in use, the
hash, the tensors (the module's keys, the head, floating dtype, finite values and, given θ0, the
dtype and shape of every target). Nothing is ever unpickled: files are read with ``safetensors`` only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from compolab.errors import CompolabError, ConfigError
from compolab.io import canonical_json, file_sha256, read_json, write_json, write_safetensors
from compolab.tuning import STYLES, TaskModule

__all__ = ["POOL_FORMAT", "PoolEntry", "Pool", "file_sha256", "card_sha256"]

#: Format of the manifest and cards ("2": the card's sha256 covers the card too).
POOL_FORMAT = "2"
_HEAD = "head::"  # prefix of the head's tensors inside a module file
_TASK_FILE = re.compile(r"^task_(\d{3,})\.(json|safetensors)$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def card_sha256(module_path: str | Path, card: Mapping) -> str:
    """The hash a card stores: sha256 of the module file's bytes, then of the card's canonical JSON
    without its ``sha256`` field."""
    h = hashlib.sha256(bytes.fromhex(file_sha256(module_path)))
    h.update(canonical_json({k: v for k, v in card.items() if k != "sha256"}))
    return h.hexdigest()


@dataclass
class PoolEntry:
    """One task's module, head and card.

    Attributes:
        task: Task id t.
        module: τ_t's own tensors (full ΔW, LoRA factors or (IA)³ scalings).
        head: The task head h_t (outputs = the task's classes, in order).
        card: JSON-ready description: ``classes``, ``method``, ``style``, ``hparams``, ``metrics``.
    """

    task: int
    module: TaskModule
    head: nn.Linear
    card: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[int]:
        return list(self.card["classes"])


class Pool:
    """A folder of modules trained on one benchmark from one θ0.

    Use :meth:`create` for a new pool and :meth:`open` for an existing one.
    """

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest

    # ------------------------------------------------------------------ folder

    @classmethod
    def create(cls, root: str | Path, *, theta0_sha256: str, **description) -> Pool:
        """Create (or re-open, if it matches) a pool for θ0 with fingerprint ``theta0_sha256``.

        Args:
            root: The pool folder.
            theta0_sha256: :func:`compolab.models.fingerprint` of θ0.
            **description: JSON-ready facts stored in the manifest (backbone, benchmark, config).

        Raises:
            CompolabError: If the folder holds a pool of another θ0.
        """
        root = Path(root)
        if (root / "pool.json").exists():
            pool = cls.open(root)
            if pool.manifest["theta0_sha256"] != theta0_sha256:
                raise CompolabError(f"{root} holds a pool of another backbone (θ0 fingerprint differs)")
            return pool
        root.mkdir(parents=True, exist_ok=True)
        manifest = {"compolab_format": POOL_FORMAT, "theta0_sha256": theta0_sha256, **description}
        write_json(root / "pool.json", manifest)
        return cls(root, manifest)

    @classmethod
    def open(cls, root: str | Path) -> Pool:
        """Open an existing pool folder.

        Raises:
            CompolabError: If the folder or its manifest is missing or unreadable.
        """
        root = Path(root)
        path = root / "pool.json"
        if not path.exists():
            raise CompolabError(f"{root} is not a module pool (no pool.json); train one first")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CompolabError(f"{path} is not valid JSON: {e}") from e
        if manifest.get("compolab_format") != POOL_FORMAT:
            raise CompolabError(f"{path}: unsupported pool format {manifest.get('compolab_format')!r}")
        return cls(root, manifest)

    def _paths(self, task: int) -> tuple[Path, Path]:
        return self.root / f"task_{task:03d}.safetensors", self.root / f"task_{task:03d}.json"

    def tasks(self) -> list[int]:
        """Ids of the tasks with a complete module (a card next to its tensor file)."""
        out = []
        for card in sorted(self.root.glob("task_*.json")):
            task = int(card.stem.split("_")[1])
            if self._paths(task)[0].exists():
                out.append(task)
        return out

    # ------------------------------------------------------------------ save / load

    def save(self, entry: PoolEntry) -> Path:
        """Write one module atomically; returns the tensor file's path."""
        tensors = dict(entry.module.state_tensors())
        for name, p in entry.head.state_dict().items():
            tensors[_HEAD + name] = p.detach().contiguous().clone()
        path, card_path = self._paths(entry.task)
        meta = {"compolab_format": POOL_FORMAT, "task": str(entry.task), "style": entry.module.style}
        write_safetensors(path, tensors, metadata=meta)
        card = {
            **entry.card,
            "task": entry.task,
            "style": entry.module.style,
            "names": list(entry.module.names),
            "num_trainable": entry.module.num_trainable(),
            "theta0_sha256": self.manifest["theta0_sha256"],
            "sha256": file_sha256(path),
        }
        entry.card = card
        write_json(card_path, card)
        return path

    def load(self, task: int, *, theta0_sha256: str) -> PoolEntry:
        """Read one module, after checking that it belongs to θ0 and is intact.

        Args:
            task: Task id.
            theta0_sha256: Fingerprint of the backbone in use.

        Raises:
            ConfigError: If the pool has no such task.
            CompolabError: For a θ0 mismatch, a damaged / truncated / foreign file.
        """
        path, card_path = self._paths(task)
        if task not in self.tasks():
            raise ConfigError(f"task {task} is not in the pool {self.root}; it has tasks {self.tasks()}")
        card = json.loads(card_path.read_text())
        if card.get("theta0_sha256") != theta0_sha256:
            raise CompolabError(
                f"{path.name} was trained from another backbone: its θ0 fingerprint "
                f"{str(card.get('theta0_sha256'))[:12]}… differs from the backbone in use "
                f"{theta0_sha256[:12]}…"
            )
        if file_sha256(path) != card.get("sha256"):
            raise CompolabError(
                f"{path} does not match its card (truncated or modified); retrain task {task}"
            )
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CompolabError(f"{path} is not a readable safetensors file: {e}") from e
        head_state = {k[len(_HEAD) :]: v for k, v in tensors.items() if k.startswith(_HEAD)}
        module_tensors = {k: v for k, v in tensors.items() if not k.startswith(_HEAD)}
        module = TaskModule.from_state_tensors(card["style"], card["names"], module_tensors)
        weight = head_state["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
        head.load_state_dict(head_state)
        return PoolEntry(task, module.requires_grad_(False), head.requires_grad_(False), card)

    def load_all(self, *, theta0_sha256: str) -> dict[int, PoolEntry]:
        """Every task of the pool, checked; ``{task: entry}``."""
        return {t: self.load(t, theta0_sha256=theta0_sha256) for t in self.tasks()}
