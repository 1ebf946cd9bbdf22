"""The read side of the kit: a pool on disk, opened with its θ0 and benchmark, composed and evaluated.

Every reader of a pool — ``compolab compose``, the probes, the editing measurements behind the
tables, the explorer and the notebooks — comes in through :func:`open_pool`, which needs nothing of
the training driver:

>>> opened = open_pool("runs/ita/pool")                                  # doctest: +SKIP
>>> plan = plan_composition(opened.tasks, drop=[1])                      # doctest: +SKIP
>>> compose_and_evaluate(opened, plan)["average_accuracy"]               # doctest: +SKIP

θ0 comes from the pool's manifest (its preset and checkpoint) through
:func:`compolab.config.load_theta0` with ``download=False``: a pool of the paper preset needs θ0
in the local cache, and the backbone's fingerprint must be the manifest's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from compolab.config import get_preset, load_benchmark_for, load_theta0
from compolab.data import Benchmark, TinyWorldConfig, tiny_benchmark
from compolab.editing import CompositionPlan, compose_pool
from compolab.errors import CompolabError, ConfigError
from compolab.evaluate import evaluate_tasks, final_average
from compolab.fisher_store import DiagonalFisher
from compolab.heads import IncrementalHead
from compolab.methods import Method, get_method, saved_fisher
from compolab.models import fingerprint, theta0_of
from compolab.pool import Pool, PoolEntry
from compolab.runtime import Runtime

__all__ = ["OpenedPool", "open_pool", "compose_and_evaluate", "pool_benchmark", "require_weights"]


@dataclass
class OpenedPool:
    """A pool with what it was trained from.

    Attributes:
        pool: The pool folder.
        method: The method that trained it (None for a hand-made pool: its modules are merged).
        backbone: θ0's model, frozen, in eval mode.
        theta0: θ0's tuned weights.
        bench: The benchmark of the manifest (None when opened with ``load_data=False``).
        entries: ``task -> PoolEntry`` of the loaded modules.
        runtime: Where θ0 and the modules are, and the autocast of evaluation.
    """

    pool: Pool
    method: Method | None
    backbone: nn.Module
    theta0: dict[str, Tensor]
    bench: Benchmark | None
    entries: dict[int, PoolEntry]
    runtime: Runtime

    @property
    def tasks(self) -> list[int]:
        """Every task the pool holds (loaded or not)."""
        return self.pool.tasks()

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def compose(self, plan: CompositionPlan) -> tuple[nn.Module, IncrementalHead]:
        """``(model, head)`` of a plan: the method's composition (TMC: its linearised model),
        :func:`~compolab.editing.compose_pool` for a pool that names no method."""
        compose = self.method.compose if self.method is not None else compose_pool
        model, head = compose(self.backbone, self.theta0, self.entries, plan)
        return model.eval(), head

    def fisher(self) -> DiagonalFisher | None:
        """The diagonal Fisher an ITA / IEL run saved next to this pool (None if it kept none)."""
        fisher = saved_fisher(Path(self.pool.root).parent / "state")
        return fisher.to(self.device) if fisher is not None else None


def open_pool(
    pool: str | Path | Pool,
    *,
    tasks: Sequence[int] | None = None,
    load_data: bool = True,
    bench: Benchmark | None = None,
    backbone: nn.Module | None = None,
    runtime: Runtime | str | torch.device | None = None,
) -> OpenedPool:
    """Open a pool folder (or :class:`~compolab.pool.Pool`) with its θ0, benchmark and modules.

    Args:
        pool: The pool (a run's ``pool/``).
        tasks: The modules to load (default: all).
        load_data: Build the benchmark of the manifest (not needed to compose only).
        bench: Use this benchmark instead (a caller that has it already).
        backbone: Use this θ0 instead of the manifest's (its fingerprint is still checked).
        runtime: Where θ0 and the modules go, and the autocast of evaluation: a
            :class:`~compolab.runtime.Runtime` or a device (float32 there); default the CPU.

    Raises:
        CompolabError: One line, before any weights are loaded, for an empty pool or a bad
            benchmark description; then if θ0 is not local or is not the pool's θ0, or a module
            does not fit it.
    """
    pool = pool if isinstance(pool, Pool) else Pool.open(pool)
    if not pool.tasks():
        raise ConfigError(f"{pool.root} holds no module yet")
    m = pool.manifest
    method = get_method(m["method"]) if m.get("method") is not None else None
    world = _manifest_world(pool) if bench is None and load_data else None  # checked before θ0 loads
    runtime = Runtime.of(runtime)
    if backbone is None:
        backbone = load_theta0(get_preset(m.get("preset", "tiny")), m.get("checkpoint"), download=False)
    backbone = backbone.to(runtime.device).eval().requires_grad_(False)
    sha = fingerprint(backbone)
    if sha != m["theta0_sha256"]:
        preset = m.get("preset", "tiny")
        raise CompolabError(f"{pool.root} was trained from another backbone than {preset}'s θ0")
    if bench is None and load_data:
        bench = tiny_benchmark(world) if world is not None else _real_benchmark(pool)
    theta0 = theta0_of(backbone)
    ids = pool.tasks() if tasks is None else sorted(set(tasks))
    entries = {t: pool.load(t, theta0_sha256=sha, theta0=theta0) for t in ids}
    return OpenedPool(pool, method, backbone, theta0, bench, entries, runtime)


def require_weights(pool: Pool, why: str, method: Method | None = None) -> None:
    """Refuse a pool of tangents (TMC) for an operation on weights of θ0's model; ``why`` ends the line.

    ``method`` is the pool's (an :class:`OpenedPool`'s ``method``); default: the manifest's.

    Raises:
        ConfigError: ``<pool> is a TMC pool: ...; <why>``.
    """
    name = pool.manifest.get("method")
    method = method if method is not None else get_method(name) if name is not None else None
    if method is not None and method.linearised:
        raise ConfigError(f"{pool.root} is a TMC pool: its components are tangents of the linearised model, "
                          f"not weights of θ0's model; {why}")  # fmt: skip


def pool_benchmark(pool: Pool) -> Benchmark:
    """The benchmark a pool's manifest describes (the tiny world's sizes, or a real dataset's name).

    Raises:
        CompolabError: A tiny world description with unknown or bad fields.
    """
    world = _manifest_world(pool)
    return tiny_benchmark(world) if world is not None else _real_benchmark(pool)


def _manifest_world(pool: Pool) -> TinyWorldConfig | None:
    """The tiny world of a pool's manifest, checked (None for a real dataset)."""
    info = pool.manifest.get("benchmark", {})
    if info.get("name") != "tiny":
        return None
    try:
        return TinyWorldConfig(**info.get("config", {}))
    except (TypeError, ValueError) as e:  # unknown / missing fields, bad values
        raise CompolabError(f"{pool.root / 'pool.json'}: bad tiny benchmark config ({e})") from None


def _real_benchmark(pool: Pool) -> Benchmark:
    preset = get_preset(pool.manifest.get("preset", "tiny"))
    return load_benchmark_for(preset, pool.manifest.get("benchmark", {}).get("name"))


def compose_and_evaluate(
    opened: OpenedPool,
    plan: CompositionPlan,
    *,
    split: str = "test",
    evaluate: bool = True,
    progress: bool | None = False,
) -> dict:
    """Compose a plan and (``evaluate``) measure it on the plan's tasks: what ``compolab compose`` prints.

    Args:
        opened: From :func:`open_pool` (with the plan's modules and, to evaluate, the benchmark).
        plan: From :func:`~compolab.editing.plan_composition`.
        split: ``train``, ``val`` or ``test``.
        evaluate: Measure accuracy (else only describe the composition).
        progress: Show a progress bar.

    Returns:
        A JSON-ready dict: ``{"composition", "num_classes"}`` plus, evaluated,
        ``"per_task_accuracy"`` (``str(t) -> %``) and ``"average_accuracy"``.
    """
    model, head = opened.compose(plan)
    composition = {key: list(value) for key, value in plan.describe().items()}  # JSON-ready: lists
    result: dict = {"composition": composition, "num_classes": len(head.global_labels)}
    if not evaluate:
        return result
    if opened.bench is None:
        raise ConfigError("the pool was opened with load_data=False: no benchmark to evaluate on")
    with opened.runtime.autocast_context():
        acc = evaluate_tasks(model, head, opened.bench, plan.tasks, split=split, progress=progress,
                             device=opened.device)  # fmt: skip
    result["per_task_accuracy"] = {str(t): round(a, 2) for t, a in acc.items()}
    result["average_accuracy"] = round(final_average(acc), 2)
    return result
