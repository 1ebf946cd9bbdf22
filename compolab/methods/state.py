"""The typed states that methods keep across tasks, and their files (safetensors + JSON).

* :class:`SecondOrderState` (ITA, IEL): the class statistics of θ0's features, the pre-tuned
  classifier :math:`C_{pre}` and the running sum of the tasks' diagonal Fishers at θ0;
* :class:`EWCState` (EWC): the sum of the previous tasks' mean Fishers and the trained heads.

A state is saved after every task into the run's ``state/`` folder: ``state.safetensors`` (the
tensors) then ``state.json`` (``after_task`` and the counts), each written atomically, so a
``state.json`` never describes tensors that are not there. Nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from compolab.errors import CompolabError
from compolab.fisher_store import DiagonalFisher
from compolab.heads import ClassGaussians, IncrementalHead
from compolab.io import write_json, write_safetensors

__all__ = [
    "SecondOrderState",
    "EWCState",
    "MethodState",
    "save_second_order_state",
    "load_second_order_state",
    "save_ewc_state",
    "load_ewc_state",
    "saved_fisher",
]

_TENSORS, _META = "state.safetensors", "state.json"


@dataclass
class SecondOrderState:
    """What ITA and IEL keep across tasks.

    Attributes:
        stats: Per-class Gaussians of θ0's features (for the classifier alignment).
        cpre: The pre-tuned classifier of the last task (anchor of the head penalty).
        fisher: Sum of the finished tasks' diagonal Fishers at θ0, with their sample count
            (None before the first one, or with ``ablation`` other than ``none``).
        pending: The current task's Fisher, added to ``fisher`` when the task is finished.
    """

    stats: ClassGaussians = field(default_factory=ClassGaussians)
    cpre: IncrementalHead | None = None
    fisher: DiagonalFisher | None = None
    pending: DiagonalFisher | None = None


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
    meta = folder / _META
    info = json.loads(meta.read_text()) if meta.exists() else {}
    if info.get("after_task") != after_task:
        raise CompolabError(f"cannot resume: {folder} does not hold the state after task {after_task}")
    return load_file(str(folder / _TENSORS)), info


def _write(folder: Path, tensors: dict[str, Tensor], info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / _TENSORS, tensors)
    write_json(folder / _META, info, indent=None)


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
    _write(Path(folder), tensors, info)


def load_second_order_state(folder: str | Path, after_task: int) -> SecondOrderState:
    """Read what :func:`save_second_order_state` wrote after task ``after_task``.

    Raises:
        CompolabError: If the folder holds no state, or the state of another task.
    """
    tensors, info = _read(Path(folder), after_task)
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


def saved_fisher(folder: str | Path) -> DiagonalFisher | None:
    """The running sum of the tasks' diagonal Fishers that an ITA / IEL run keeps in its ``state/``
    folder (``folder``), or None when the run kept none (e.g. ``ablation="no-reg"``)."""
    folder = Path(folder)
    if not (folder / _TENSORS).exists() or not (folder / _META).exists():
        return None
    count = json.loads((folder / _META).read_text()).get("fisher_count", 0)
    values = _prefixed(load_file(str(folder / _TENSORS)), "fisher")
    return DiagonalFisher(values, count) if values and count else None
