"""The methods: what each one freezes, weights and penalises when it trains task t.

| method | forward while training τ_t | composition at evaluation | penalty |
|---|---|---|---|
| ``naive`` | θ0 + τ_t | θ0 + (1/T) Σ τ_s (task arithmetic) | none |
| ``seq`` | θ0 + Σ_{s<t} τ_s + τ_t (sequential fine-tuning) | θ0 + Σ τ_s | none |
| ``joint`` | θ0 + τ on every task's data at once (upper bound) | θ0 + τ | none |

ITA, IEL and EWC are registered by ``compolab.incremental`` on the same context (imported at the
end of this module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset

from compolab.compose import merge
from compolab.data import Benchmark, Task
from compolab.editing import CompositionPlan, compose_pool
from compolab.errors import ConfigError
from compolab.finetune import FinetuneConfig, finetune_task
from compolab.heads import IncrementalHead
from compolab.pool import PoolEntry
from compolab.task_vector import TaskVector

__all__ = ["METHODS", "ABLATIONS", "MethodConfig", "TaskContext", "train_task", "register"]

ABLATIONS = ("none", "no-reg", "cls-only")


@dataclass(frozen=True)
class MethodConfig:
    """Knobs of the methods (defaults: the tiny preset's values; paper values in ``compolab.presets``).

    Attributes:
        alpha: α of ITA's penalty (Eq. 11–12), ≥ 0.
        beta: β of IEL's penalty (Eq. 18–19), ≥ 0.
        ewc_lambda: strength of the EWC baseline's penalty, ≥ 0.
        ablation: ``none``; ``no-reg`` ("without Eq. 12 / 19": no backbone and no head penalty);
            ``cls-only`` ("reg only on CLS": the head penalty only).
        pretune: Head pre-tuning (linear probe + classifier alignment, spec §A.6).
        req_weight_cls: Fisher-weighted head penalty (spec §A.6); None = α (ITA) or β (IEL).
        simple_reg_weight_cls: Plain L2 head penalty.
        pretune_epochs: Linear-probe epochs of the pre-tuning.
        pretune_lr: Its SGD learning rate.
        align_epochs: Classifier-alignment epochs at task 0 (the paper adds 5 per task).
        align_samples: Synthetic features per class and alignment epoch.
        fisher_kind: ``exact``, ``mc`` or ``empirical`` (spec §A.5: exact).
        fisher_top_k: Official ``fisher_mc_classes`` knob (None = all classes; exact only).
        fisher_samples: Training images of the task used for its Fisher (a seeded subset; None =
            all, as the paper). The Fisher is a mean per example, so a subset is an unbiased
            estimate of it; it bounds the cost of the exact Fisher, ≈ C backward passes per image.
        mc_samples: Labels drawn per image by the ``mc`` Fisher.
        decoupled: Apply the penalty as the paper's separate SGD step (spec §A.8); None = the
            paper's choice (LoRA and (IA)³ decoupled, full fine-tuning coupled).
    """

    alpha: float = 1.0
    beta: float = 1.0
    ewc_lambda: float = 1.0
    ablation: str = "none"
    pretune: bool = True
    req_weight_cls: float | None = None
    simple_reg_weight_cls: float = 0.001
    pretune_epochs: int = 3
    pretune_lr: float = 0.01
    align_epochs: int = 10
    align_samples: int = 64
    fisher_kind: str = "exact"
    fisher_top_k: int | None = None
    fisher_samples: int | None = None
    mc_samples: int = 1
    decoupled: bool | None = None

    def __post_init__(self) -> None:
        for f in ("alpha", "beta", "ewc_lambda", "simple_reg_weight_cls", "pretune_lr"):
            value = getattr(self, f)
            if not value >= 0:
                raise ConfigError(f"MethodConfig.{f} must be >= 0, got {value}")
        if self.req_weight_cls is not None and not self.req_weight_cls >= 0:
            raise ConfigError(f"MethodConfig.req_weight_cls must be >= 0, got {self.req_weight_cls}")
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"unknown ablation {self.ablation!r}; choose one of {list(ABLATIONS)}")
        for f in ("pretune_epochs", "align_epochs", "align_samples"):
            if getattr(self, f) < 0:
                raise ConfigError(f"MethodConfig.{f} must be >= 0, got {getattr(self, f)}")
        if self.fisher_kind not in ("exact", "mc", "empirical"):
            raise ConfigError(f"unknown fisher_kind {self.fisher_kind!r}; choose exact, mc or empirical")
        if self.fisher_top_k is not None and (self.fisher_kind != "exact" or self.fisher_top_k <= 0):
            raise ConfigError("MethodConfig.fisher_top_k needs fisher_kind='exact' and a value > 0")
        for f in ("fisher_samples", "mc_samples"):
            value = getattr(self, f)
            if value is not None and value <= 0:
                raise ConfigError(f"MethodConfig.{f} must be > 0, got {value}")


@dataclass
class TaskContext:
    """What a method needs across tasks: the benchmark, θ0 and the state it accumulates."""

    method: str
    finetune: FinetuneConfig
    cfg: MethodConfig
    bench: Benchmark
    backbone: nn.Module
    theta0: dict[str, Tensor]
    names: list[str]
    device: str | torch.device = "cpu"
    progress: bool | None = True
    taus: dict[int, TaskVector] = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    def restore(self, entries: dict[int, PoolEntry]) -> None:
        """Rebuild the state of the finished tasks (``--resume``)."""
        for t in sorted(entries):
            self.taus[t] = entries[t].module.delta(self.theta0).detach()
        hook = _RESTORE.get(self.method)
        if hook is not None and entries:
            hook(self, entries)

    def finish(self, entry: PoolEntry) -> None:
        """Record a finished task's module."""
        self.taus[entry.task] = entry.module.delta(self.theta0).detach()
        hook = _FINISH.get(self.method)
        if hook is not None:
            hook(self, entry)

    def eval_coefs(self, num_tasks: int) -> list[float]:
        """Weights of the composition at evaluation: 1 each for ``seq``/``ewc``, else 1/T."""
        if self.method in ("seq", "ewc"):
            return [1.0] * num_tasks
        return [1.0 / num_tasks] * num_tasks

    def offset(self, t: int) -> int:
        return self.bench.offsets[t]

    def joint_model(self, entry: PoolEntry) -> tuple[nn.Module, IncrementalHead]:
        """The joint baseline's model: θ0 + τ with the one head over every class."""
        model = merge(self.backbone, self.theta0, [entry.module.delta(self.theta0).detach()], [1.0])
        head = IncrementalHead([entry.head], tasks=(0,), classes=[entry.classes])
        return model, head

    # --- evaluation hook (added for TMC) -------------------------------------------------------
    def eval_model(
        self, entries: dict[int, PoolEntry], plan: CompositionPlan
    ) -> tuple[nn.Module, IncrementalHead]:
        """The model evaluated after a task: the method's own composition if it registered one
        (TMC: the linearised model), else the merged θ0 + Σ w_t τ_t (:func:`compose_pool`)."""
        hook = _EVAL.get(self.method)
        if hook is not None:
            return hook(self, entries, plan)
        return compose_pool(self.backbone, self.theta0, entries, plan)

    # --- end of the evaluation hook ------------------------------------------------------------


TrainFn = Callable[[TaskContext, int], PoolEntry]
_TRAIN: dict[str, TrainFn] = {}
_FINISH: dict[str, Callable[[TaskContext, PoolEntry], None]] = {}
_RESTORE: dict[str, Callable[[TaskContext, dict], None]] = {}
EvalFn = Callable[[TaskContext, dict, CompositionPlan], tuple[nn.Module, IncrementalHead]]
_EVAL: dict[str, EvalFn] = {}
METHODS: list[str] = []


def register(
    name: str,
    train: TrainFn,
    finish: Callable[[TaskContext, PoolEntry], None] | None = None,
    restore: Callable[[TaskContext, dict], None] | None = None,
    evaluate: EvalFn | None = None,
) -> None:
    """Add a method: ``train(ctx, t) -> PoolEntry``, and optional hooks run after a task
    (``finish(ctx, entry)``), when a run resumes (``restore(ctx, entries)``) and to build the
    evaluated model (``evaluate(ctx, entries, plan) -> (model, head)``, default :func:`compose_pool`)."""
    _TRAIN[name] = train
    if finish is not None:
        _FINISH[name] = finish
    if restore is not None:
        _RESTORE[name] = restore
    if evaluate is not None:
        _EVAL[name] = evaluate
    if name not in METHODS:
        METHODS.append(name)


def train_task(ctx: TaskContext, t: int) -> PoolEntry:
    """Train task ``t`` with the context's method."""
    return _TRAIN[ctx.method](ctx, t)


def _entry(ctx: TaskContext, t: int, result, classes, **extra) -> PoolEntry:
    card = {
        "classes": list(classes),
        "method": ctx.method,
        "hparams": {"finetune": ctx.finetune.__dict__, **extra},
        "metrics": {"history": result.history, "seconds": round(result.seconds, 2)},
    }
    return PoolEntry(t, result.module, result.head, card)


def _train_naive(ctx: TaskContext, t: int) -> PoolEntry:
    task = ctx.bench.tasks[t]
    result = finetune_task(ctx.backbone, ctx.theta0, task, ctx.offset(t), _seeded(ctx.finetune, t),
                           names=ctx.names, progress=ctx.progress, device=ctx.device)  # fmt: skip
    return _entry(ctx, t, result, task.classes)


def _train_seq(ctx: TaskContext, t: int) -> PoolEntry:
    task = ctx.bench.tasks[t]
    frozen = [ctx.taus[s] for s in range(t)]
    result = finetune_task(ctx.backbone, ctx.theta0, task, ctx.offset(t), _seeded(ctx.finetune, t),
                           names=ctx.names, frozen=frozen, frozen_coefs=[1.0] * t,
                           progress=ctx.progress, device=ctx.device)  # fmt: skip
    return _entry(ctx, t, result, task.classes)


def _train_joint(ctx: TaskContext, t: int) -> PoolEntry:
    bench = ctx.bench
    every = Task(0, tuple(range(bench.num_classes)),
                 ConcatDataset([k.train for k in bench.tasks]),
                 ConcatDataset([k.val for k in bench.tasks]),
                 ConcatDataset([k.test for k in bench.tasks]))  # fmt: skip
    result = finetune_task(ctx.backbone, ctx.theta0, every, 0, ctx.finetune, names=ctx.names,
                           progress=ctx.progress, device=ctx.device)  # fmt: skip
    return _entry(ctx, 0, result, every.classes)


def _seeded(cfg: FinetuneConfig, t: int) -> FinetuneConfig:
    """Each task gets its own seed (module init and batch order), derived from the run's."""
    from dataclasses import replace

    return replace(cfg, seed=cfg.seed * 1000 + t)


register("naive", _train_naive)
register("seq", _train_seq)
register("joint", _train_joint)


import compolab.incremental  # noqa: E402, F401  - registers ita, iel and ewc
import compolab.tmc  # noqa: E402, F401  - registers tmc
