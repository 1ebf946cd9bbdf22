"""Composition, unlearning and specialization of a pool of modules.

All three are one operation, θ0 + Σ_{t ∈ S} w_t τ_t − γ Σ_{k ∈ N} τ_k, with the heads of the
tasks in S only:

* **composition** — S = every task, w_t = 1/T (the paper's evaluation);
* **unlearning** — drop τ_k from S (its classes leave the output), or also *negate* it
  (k ∈ N, weight −γ), as in task arithmetic;
* **specialization** — S = a chosen subset, optionally re-weighted.

:func:`plan_composition` checks every argument before anything is loaded or merged;
:func:`compose_pool` builds one ordinary model (one inference cost whatever T) and the matching
class-incremental head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from compolab.compose import merge
from compolab.errors import ConfigError
from compolab.heads import IncrementalHead
from compolab.pool import PoolEntry
from compolab.task_vector import uniform_coefs

__all__ = ["CompositionPlan", "plan_composition", "compose_pool"]


@dataclass(frozen=True)
class CompositionPlan:
    """What is composed: tasks with their weights, negated tasks with theirs.

    Attributes:
        tasks: Tasks whose modules (and heads) are composed, in task order.
        coefs: Their weights w_t.
        negated: Tasks whose modules are subtracted (their heads are dropped).
        negated_coefs: Their strengths γ (positive numbers; the module enters as −γ τ_k).
        dropped: Available tasks left out entirely.
    """

    tasks: tuple[int, ...]
    coefs: tuple[float, ...]
    negated: tuple[int, ...] = ()
    negated_coefs: tuple[float, ...] = ()
    dropped: tuple[int, ...] = ()

    def describe(self) -> dict:
        """JSON-ready description of the composition."""
        return asdict(self)


def _check_ids(what: str, ids: Sequence[int], available: Sequence[int]) -> None:
    unknown = sorted(set(ids) - set(available))
    if unknown:
        raise ConfigError(f"unknown task id(s) {unknown} in {what}; the pool has tasks {sorted(available)}")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"repeated task id(s) in {what}: {list(ids)}")


def plan_composition(
    available: Sequence[int],
    *,
    tasks: Sequence[int] | None = None,
    drop: Sequence[int] = (),
    coefs: Sequence[float] | None = None,
    negate: Sequence[int] = (),
    negate_coef: float = 1.0,
) -> CompositionPlan:
    """Validate an edit of the pool and say exactly what will be composed.

    Args:
        available: Task ids present in the pool.
        tasks: Tasks to compose (specialization); default: every available task.
        drop: Tasks to leave out (unlearning by removal).
        coefs: Weights of the composed tasks, one per task after ``drop``; default 1/T each.
        negate: Tasks to subtract (unlearning by negation); they must not also be composed.
        negate_coef: γ, the strength of the negated tasks (λ is kept for paths θ0 + λτ).

    Returns:
        The plan.

    Raises:
        ConfigError: Unknown or repeated ids, a task both composed and negated, weights of the
            wrong length, a negative or non-finite γ, or nothing left to compose.

    Examples:
        >>> plan_composition([0, 1, 2], drop=[1]).coefs
        (0.5, 0.5)
    """
    tasks = sorted(available) if tasks is None else list(tasks)
    for what, ids in (("`tasks`", tasks), ("`drop`", list(drop)), ("`negate`", list(negate))):
        _check_ids(what, ids, available)
    kept = [t for t in tasks if t not in set(drop)]
    if not kept:
        raise ConfigError("nothing left to compose: every selected task is dropped")
    both = sorted(set(kept) & set(negate))
    if both:
        raise ConfigError(f"task(s) {both} cannot be both composed and negated")
    if coefs is None:
        coefs = uniform_coefs(len(kept))
    elif len(coefs) != len(kept):
        raise ConfigError(f"`coefs`: got {len(coefs)} weights for {len(kept)} composed tasks {kept}")
    if not (negate_coef >= 0 and negate_coef < float("inf")):
        raise ConfigError(f"`negate_coef` must be a finite number >= 0, got {negate_coef}")
    dropped = tuple(t for t in sorted(available) if t not in set(kept) | set(negate))
    return CompositionPlan(
        tasks=tuple(kept),
        coefs=tuple(float(c) for c in coefs),
        negated=tuple(negate),
        negated_coefs=tuple(float(negate_coef) for _ in negate),
        dropped=dropped,
    )


def compose_pool(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    entries: Mapping[int, PoolEntry],
    plan: CompositionPlan,
) -> tuple[nn.Module, IncrementalHead]:
    """Merge the planned modules into one ordinary model, with the heads of the composed tasks.

    Args:
        backbone: θ0's model (unchanged; a merged copy is returned).
        theta0: θ0's named parameters.
        entries: Pool entries by task id (at least the planned ones).
        plan: From :func:`plan_composition`.

    Returns:
        ``(model, head)``: θ0 + Σ w_t τ_t − γ Σ τ_k as one timm model, and the concatenated heads
        of ``plan.tasks`` (a negated or dropped task's classes are not in the output).
    """
    used = plan.tasks + plan.negated
    missing = [t for t in used if t not in entries]
    if missing:
        raise ConfigError(f"task(s) {missing} are planned but not loaded")
    device = next(iter(theta0.values())).device  # modules and heads follow θ0 (a pool loads on the CPU)
    taus = [entries[t].module.to(device).delta(theta0).detach() for t in used]
    coefs = list(plan.coefs) + [-c for c in plan.negated_coefs]
    model = merge(backbone, theta0, taus, coefs)
    head = IncrementalHead(
        [entries[t].head.to(device) for t in plan.tasks],
        tasks=plan.tasks,
        classes=[entries[t].classes for t in plan.tasks],
    )
    return model, head
