"""The typed states that methods keep across tasks, and their files (safetensors + JSON).

* :class:`SecondOrderState` (ITA, IEL): the class statistics of θ0's features, the pre-tuned
  classifier :math:`C_{pre}` and the running sum of the tasks' diagonal Fishers at θ0 (or, with
  ``curvature="kfac"``, one K-FAC per task: ``kfac_<t>.safetensors``, written once before the
  JSON of generation t, which lists the sha256 of every task's file);
* :class:`EWCState` (EWC): the sum of the previous tasks' mean Fishers and the trained heads.

A state is saved after every task t into the run's ``state/`` folder as its own generation:
``after_<t>.safetensors`` (the tensors) then ``after_<t>.json`` (``after_task``, the counts and the
tensors' sha256), each written atomically. A generation is never overwritten, so the state after
the last *committed* task (:mod:`compolab.run`) survives a kill anywhere in the next task, and the
JSON's hash pairs it with its own tensors. Loading a missing, half-saved or damaged generation is
one :class:`~compolab.errors.CompolabError` naming the file. Nothing is pickled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from compolab.errors import CompolabError
from compolab.fisher_store import DiagonalFisher
from compolab.heads import ClassGaussians, IncrementalHead
from compolab.io import file_sha256, read_json, write_json, write_safetensors
from compolab.kfac import KFAC

__all__ = [
    "SecondOrderState",
    "EWCState",
    "MethodState",
    "save_second_order_state",
    "load_second_order_state",
    "save_ewc_state",
    "load_ewc_state",
    "saved_fisher",
    "state_path",
    "kfac_path",
    "saved_generations",
]

_GENERATION = re.compile(r"^after_(\d{3,})\.(json|safetensors)$")


def state_path(folder: str | Path, after_task: int) -> Path:
    """The JSON file of the state saved after task ``after_task`` (its tensors: same stem, .safetensors)."""
    return Path(folder) / f"after_{after_task:03d}.json"


def kfac_path(folder: str | Path, task: int) -> Path:
    """The K-FAC file of task ``task`` (``curvature="kfac"``), kept by every later generation."""
    return Path(folder) / f"kfac_{task:03d}.safetensors"


def saved_generations(folder: str | Path) -> dict[int, list[Path]]:
    """``{after_task: [its files]}`` of the state generations present in ``folder``."""
    out: dict[int, list[Path]] = {}
    folder = Path(folder)
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            match = _GENERATION.match(p.name)
            if match:
                out.setdefault(int(match.group(1)), []).append(p)
    return out


@dataclass
class SecondOrderState:
    """What ITA and IEL keep across tasks.

    Attributes:
        stats: Per-class Gaussians of θ0's features (for the classifier alignment).
        cpre: The pre-tuned classifier of the last task (anchor of the head penalty).
        fisher: Sum of the finished tasks' diagonal Fishers at θ0, with their sample count
            (None before the first one, or with ``ablation`` other than ``none``).
        pending: The current task's Fisher (or K-FAC), added to ``fisher`` (``kfacs``) when the
            task is finished.
        kfacs: The finished tasks' K-FACs at θ0, one per task in order (``curvature="kfac"``).
    """

    stats: ClassGaussians = field(default_factory=ClassGaussians)
    cpre: IncrementalHead | None = None
    fisher: DiagonalFisher | None = None
    pending: DiagonalFisher | KFAC | None = None
    kfacs: list[KFAC] = field(default_factory=list)


@dataclass
class EWCState:
    """What the EWC baseline keeps across tasks.

    Attributes:
        fisher: Sum over the finished tasks of their mean Fisher, each at the weights learned on
            it (None before the first one).
        heads: The finished tasks' heads.
    """

    fisher: dict[str, Tensor] | None = None
    heads: list[nn.Linear] = field(default_factory=list)


#: The state of any method of the kit (None: the method keeps none).
MethodState = SecondOrderState | EWCState | None


def _read(folder: Path, after_task: int) -> tuple[dict[str, Tensor], dict]:
    meta = state_path(folder, after_task)
    if not meta.exists():
        raise CompolabError(f"cannot resume: {folder} does not hold the state after task {after_task}")
    info = read_json(meta, what="method state")
    tensors_path = meta.with_suffix(".safetensors")
    if info.get("after_task") != after_task or not tensors_path.exists() \
            or file_sha256(tensors_path) != info.get("tensors_sha256"):  # fmt: skip
        raise CompolabError(f"method state {tensors_path} is missing or does not match {meta.name} "
                            "(damaged or half saved)")  # fmt: skip
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CompolabError(f"method state {tensors_path} is not a readable safetensors file: {e}") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CompolabError(f"method state {tensors_path}: {bad[0]!r} holds NaN or infinite values")
    return tensors, info


def _write(folder: Path, tensors: dict[str, Tensor], info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = state_path(folder, info["after_task"])
    tensors_path = write_safetensors(meta.with_suffix(".safetensors"), tensors)
    write_json(meta, {**info, "tensors_sha256": file_sha256(tensors_path)}, indent=None)


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + "::")}


def save_second_order_state(folder: str | Path, state: SecondOrderState, after_task: int) -> None:
    """Write ITA's / IEL's state after task ``after_task``: statistics, :math:`C_{pre}`, Fisher sum."""
    tensors: dict[str, Tensor] = {}
    for c in state.stats.means:
        tensors[f"stats::{c}::mean"] = state.stats.means[c]
        tensors[f"stats::{c}::var"] = state.stats.variances[c]
    cpre = state.cpre if state.cpre is not None else IncrementalHead([], classes=[])
    for i, h in enumerate(cpre.heads):
        tensors[f"cpre::{i}::weight"] = h.weight
        tensors[f"cpre::{i}::bias"] = h.bias
    if state.fisher is not None:
        tensors.update({f"fisher::{n}": v for n, v in state.fisher.values.items()})
    count = state.fisher.num_samples if state.fisher is not None else 0
    info = {"after_task": after_task, "fisher_count": count, "cpre_classes": [list(c) for c in cpre.classes]}
    if state.kfacs:  # the newest task's file (again: an uncommitted attempt's is replaced), then all hashes
        Path(folder).mkdir(parents=True, exist_ok=True)
        for s, k in enumerate(state.kfacs):
            if s == len(state.kfacs) - 1 or not kfac_path(folder, s).exists():
                k.save(kfac_path(folder, s))
        info["kfac_sha256"] = [file_sha256(kfac_path(folder, s)) for s in range(len(state.kfacs))]
    _write(Path(folder), tensors, info)


def load_second_order_state(folder: str | Path, after_task: int) -> SecondOrderState:
    """Read what :func:`save_second_order_state` wrote after task ``after_task``.

    Raises:
        CompolabError: If the folder holds no state, the state of another task, or a damaged one.
    """
    tensors, info = _read(Path(folder), after_task)
    try:
        state = _second_order_from(tensors, info)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:
        path = state_path(folder, after_task)
        raise CompolabError(f"method state {path} is malformed ({type(e).__name__}: {e})") from None
    for s, sha in enumerate(info.get("kfac_sha256", [])):
        path = kfac_path(folder, s)
        if not path.exists() or file_sha256(path) != sha:
            raise CompolabError(f"method state {path} is missing or does not match "
                                f"{state_path(folder, after_task).name} (damaged or half saved)")  # fmt: skip
        state.kfacs.append(KFAC.load(path))
    return state


def _second_order_from(tensors: dict[str, Tensor], info: dict) -> SecondOrderState:
    stats = ClassGaussians()
    for key, v in tensors.items():
        kind, *rest = key.split("::")
        if kind == "stats":
            (stats.means if rest[1] == "mean" else stats.variances)[int(rest[0])] = v
    heads = []
    for i, classes in enumerate(info["cpre_classes"]):
        weight, bias = tensors[f"cpre::{i}::weight"], tensors[f"cpre::{i}::bias"]
        h = nn.Linear(weight.shape[1], len(classes))
        h.load_state_dict({"weight": weight, "bias": bias})
        heads.append(h.requires_grad_(False))
    fisher = _prefixed(tensors, "fisher")
    count = info.get("fisher_count", 0)
    return SecondOrderState(
        stats=stats,
        cpre=IncrementalHead(heads, classes=info["cpre_classes"]),
        fisher=DiagonalFisher(fisher, count) if fisher and count else None,
    )


def save_ewc_state(folder: str | Path, state: EWCState, after_task: int) -> None:
    """Write EWC's Fisher sum after task ``after_task`` (the heads are in the pool)."""
    tensors = {f"ewc::{n}": v for n, v in (state.fisher or {}).items()}
    _write(Path(folder), tensors, {"after_task": after_task})


def load_ewc_state(folder: str | Path, after_task: int, heads: list[nn.Linear]) -> EWCState:
    """Read what :func:`save_ewc_state` wrote after task ``after_task``; ``heads`` from the pool.

    Raises:
        CompolabError: If the folder holds no state, or the state of another task.
    """
    tensors, _ = _read(Path(folder), after_task)
    return EWCState(fisher=_prefixed(tensors, "ewc") or None, heads=list(heads))


def saved_fisher(folder: str | Path, after_task: int | None = None) -> DiagonalFisher | None:
    """The running sum of the tasks' diagonal Fishers that an ITA / IEL run keeps in its ``state/``
    folder (``folder``), after task ``after_task`` (default: the latest saved), or None when the
    run kept none (e.g. ``ablation="no-reg"``).

    Raises:
        CompolabError: If the state is damaged or half saved.
    """
    folder = Path(folder)
    saved = [t for t, files in saved_generations(folder).items() if state_path(folder, t) in files]
    if after_task is None:
        if not saved:
            return None
        after_task = max(saved)
    tensors, info = _read(folder, after_task)
    count = info.get("fisher_count", 0)
    values = _prefixed(tensors, "fisher")
    if not isinstance(count, int) or count < 0:
        raise CompolabError(f"method state {state_path(folder, after_task)}: bad fisher_count {count!r}")
    return DiagonalFisher(values, count) if values and count else None
