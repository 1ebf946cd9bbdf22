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
        """Open an existing pool folder, after checking its manifest.

        Raises:
            CompolabError: If the folder or its manifest is missing, unreadable or malformed.
        """
        root = Path(root)
        path = root / "pool.json"
        if not root.is_dir():
            raise CompolabError(f"{root} is not a module pool (not a folder); train one first")
        if not path.exists():
            raise CompolabError(f"{root} is not a module pool (no pool.json); train one first")
        manifest = read_json(path, what="pool manifest")
        if manifest.get("compolab_format") != POOL_FORMAT:
            found = manifest.get("compolab_format")
            raise CompolabError(f"{path}: unsupported pool format {found!r} (this compolab reads "
                                f"format {POOL_FORMAT!r}); retrain the pool")  # fmt: skip
        sha = manifest.get("theta0_sha256")
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise CompolabError(f"{path}: theta0_sha256 is missing or not a sha256 (64 hex digits)")
        bench = manifest.get("benchmark", {})
        if not isinstance(bench, dict) or not isinstance(bench.get("name", ""), str) \
                or not isinstance(bench.get("config", {}), dict):  # fmt: skip
            raise CompolabError(f"{path}: benchmark must be an object with a name and a config object")
        for key in ("preset", "checkpoint", "method"):
            if manifest.get(key) is not None and not isinstance(manifest[key], str):
                raise CompolabError(f"{path}: {key} must be a string, got {manifest[key]!r}")
        return cls(root, manifest)

    def _paths(self, task: int) -> tuple[Path, Path]:
        return self.root / f"task_{task:03d}.safetensors", self.root / f"task_{task:03d}.json"

    def card_path(self, task: int) -> Path:
        """The card of task ``task`` (written last: it makes the module part of the pool)."""
        return self._paths(task)[1]

    def tasks(self) -> list[int]:
        """Ids of the tasks with a complete module (a card next to its tensor file).

        Raises:
            CompolabError: For a file named ``task_*`` that is not a pool file (``task_001 copy.json``).
        """
        out = []
        for path in sorted(self.root.glob("task_*")):
            match = _TASK_FILE.match(path.name)
            if match is None:
                raise CompolabError(f"{path} is not a pool file (expected task_NNN.json or "
                                    "task_NNN.safetensors); move it out of the pool")  # fmt: skip
            task = int(match.group(1))
            if match.group(2) == "json" and self._paths(task)[0].exists():
                out.append(task)
        return out

    # ------------------------------------------------------------------ save / load

    def save(self, entry: PoolEntry) -> Path:
        """Write one module atomically (tensors, then the card); returns the tensor file's path."""
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
        }
        card = json.loads(json.dumps(card))  # the card as it reads back (tuples -> lists, ...)
        card["sha256"] = card_sha256(path, card)
        entry.card = card
        write_json(card_path, card)
        return path

    def load(
        self, task: int, *, theta0_sha256: str, theta0: Mapping[str, Tensor] | None = None
    ) -> PoolEntry:
        """Read one module, after checking that it belongs to θ0 and is intact.

        Args:
            task: Task id.
            theta0_sha256: Fingerprint of the backbone in use.
            theta0: θ0's weights; when given, every target's dtype and shape are checked too.

        Raises:
            ConfigError: If the pool has no such task.
            CompolabError: For a θ0 mismatch, a damaged / truncated / edited / foreign file, a
                malformed card, or tensors that do not make a module (keys, head, dtype, shape,
                NaN / infinite values).
        """
        path, card_path = self._paths(task)
        if task not in self.tasks():
            raise ConfigError(f"task {task} is not in the pool {self.root}; it has tasks {self.tasks()}")
        card = read_json(card_path, what="module card")
        _check_card(card_path, card, task)
        if card["theta0_sha256"] != theta0_sha256:
            raise CompolabError(
                f"{path.name} was trained from another backbone: its θ0 fingerprint "
                f"{str(card.get('theta0_sha256'))[:12]}… differs from the backbone in use "
                f"{theta0_sha256[:12]}…"
            )
        if card_sha256(path, card) != card["sha256"]:
            raise CompolabError(
                f"{path} does not match its card (truncated or modified, or the card was edited); "
                f"retrain task {task}"
            )
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CompolabError(f"{path} is not a readable safetensors file: {e}") from e
        head_state = {k[len(_HEAD) :]: v for k, v in tensors.items() if k.startswith(_HEAD)}
        module_tensors = {k: v for k, v in tensors.items() if not k.startswith(_HEAD)}
        _check_tensors(path, tensors, head_state, len(card["classes"]))
        try:
            module = TaskModule.from_state_tensors(card["style"], card["names"], module_tensors)
        except ConfigError as e:
            raise CompolabError(f"{path}: {e}") from None
        if theta0 is not None:
            _check_fits(path, module, theta0)
        weight = head_state["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
        head.load_state_dict(head_state)
        return PoolEntry(task, module.requires_grad_(False), head.requires_grad_(False), card)

    def load_all(
        self, *, theta0_sha256: str, theta0: Mapping[str, Tensor] | None = None
    ) -> dict[int, PoolEntry]:
        """Every task of the pool, checked; ``{task: entry}``."""
        return {t: self.load(t, theta0_sha256=theta0_sha256, theta0=theta0) for t in self.tasks()}


def _check_card(path: Path, card: dict, task: int) -> None:
    """The card's schema: one line naming the file and the field."""
    def bad(field: str, expected: str):
        return CompolabError(f"module card {path}: {field} must be {expected}, got {card.get(field)!r}")

    for key in ("theta0_sha256", "sha256"):
        if not isinstance(card.get(key), str) or not _SHA.match(card[key]):
            raise bad(key, "a sha256 (64 hex digits)")
    if card.get("task") != task or isinstance(card.get("task"), bool):
        raise bad("task", f"{task} (the file's task id)")
    if card.get("style") not in STYLES:
        raise bad("style", f"one of {sorted(STYLES)}")
    names = card.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("names", "a non-empty list of weight names")
    classes = card.get("classes")
    ids = isinstance(classes, list) and all(type(c) is int and c >= 0 for c in classes)
    if not ids or not classes or len(set(classes)) != len(classes):
        raise bad("classes", "a non-empty list of distinct class ids >= 0")


def _check_tensors(path: Path, tensors: dict[str, Tensor], head: dict[str, Tensor], num_classes: int) -> None:
    """Floating, finite tensors and a head of at least ``num_classes`` rows."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise CompolabError(f"{path}: tensor {key!r} has dtype {t.dtype}; modules are floating point")
        if not bool(torch.isfinite(t).all()):
            raise CompolabError(f"{path}: tensor {key!r} holds NaN or infinite values; retrain this task")
    if set(head) != {"weight", "bias"}:
        raise CompolabError(f"{path}: no task head (expected tensors {_HEAD}weight and {_HEAD}bias)")
    w, b = head["weight"], head["bias"]
    if w.ndim != 2 or b.shape != (w.shape[0],) or w.shape[0] < num_classes:  # a TMC head covers all classes
        raise CompolabError(f"{path}: the head has shape {tuple(w.shape)} / {tuple(b.shape)}; its card "
                            f"lists {num_classes} classes")  # fmt: skip


def _check_fits(path: Path, module: TaskModule, theta0: Mapping[str, Tensor]) -> None:
    """Every target's tensors have θ0's dtype, and ΔW has θ0's shape."""
    missing = [n for n in module.names if n not in theta0]
    if missing:
        raise CompolabError(f"{path}: targets {missing[:3]} are not weights of θ0")
    for role, tensors in module.tensor_lists().items():
        for name, p in zip(module.names, tensors, strict=True):
            if p.dtype != theta0[name].dtype:
                raise CompolabError(f"{path}: the {role} tensor of {name} has dtype {p.dtype}, θ0 has "
                                    f"{theta0[name].dtype}")  # fmt: skip
    try:
        with torch.no_grad():
            module.delta({n: theta0[n].to("cpu") for n in module.names})
    except (RuntimeError, ConfigError) as e:
        first = str(e).splitlines()[0]
        raise CompolabError(f"{path}: the module does not fit θ0 (tensor shapes: {first})") from None
