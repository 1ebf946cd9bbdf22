"""The baselines without a penalty: naive task arithmetic, sequential fine-tuning, joint training.

| method | forward while training τ_t | composition at evaluation |
|---|---|---|
| :class:`Naive` | θ0 + τ_t | θ0 + (1/T) Σ τ_s (task arithmetic) |
| :class:`Sequential` | θ0 + Σ_{s<t} τ_s + τ_t | θ0 + Σ τ_s |
| :class:`Joint` | θ0 + τ on every task's data at once (upper bound) | θ0 + τ, tested on every task |
"""

from __future__ import annotations

from torch.utils.data import ConcatDataset

from compolab.data import Benchmark, Task
from compolab.finetune import finetune_task
from compolab.methods.base import MergedMethod, TaskContext
from compolab.pool import PoolEntry

__all__ = ["Naive", "Sequential", "Joint"]


class Naive(MergedMethod):
    """Independent fine-tuning of each task from θ0, then task arithmetic (w_t = 1/T)."""

    name = "naive"
    label = "naive task arithmetic"
    editable = True

    def train(self, ctx: TaskContext, t: int) -> PoolEntry:
        task = ctx.bench.tasks[t]
        result = finetune_task(ctx.backbone, ctx.theta0, task, ctx.offset(t), ctx.seeded(t),
                               names=ctx.names, progress=ctx.progress, runtime=ctx.runtime)  # fmt: skip
        return ctx.entry(t, result, task.classes)


class Sequential(MergedMethod):
    """Sequential fine-tuning: task t starts from θ0 + Σ_{s<t} τ_s; evaluated at θ0 + Σ τ_s."""

    name = "seq"
    label = "sequential fine-tuning"

    def eval_coefs(self, num_tasks: int) -> list[float]:
        return [1.0] * num_tasks

    def train(self, ctx: TaskContext, t: int) -> PoolEntry:
        task = ctx.bench.tasks[t]
        result = finetune_task(ctx.backbone, ctx.theta0, task, ctx.offset(t), ctx.seeded(t),
                               names=ctx.names, frozen=[ctx.taus[s] for s in range(t)],
                               frozen_coefs=[1.0] * t, progress=ctx.progress,
                               runtime=ctx.runtime)  # fmt: skip
        return ctx.entry(t, result, task.classes)


class Joint(MergedMethod):
    """One module and one head trained on every task's data at once (the upper bound)."""

    name = "joint"
    label = "joint (upper bound)"

    def tasks(self, bench: Benchmark) -> list[int]:
        return [0]

    def evaluated_tasks(self, bench: Benchmark, t: int) -> list[int]:
        return list(range(bench.num_tasks))

    def eval_coefs(self, num_tasks: int) -> list[float]:
        return [1.0] * num_tasks

    def train(self, ctx: TaskContext, t: int) -> PoolEntry:
        bench = ctx.bench
        every = Task(0, tuple(range(bench.num_classes)),
                     ConcatDataset([k.train for k in bench.tasks]),
                     ConcatDataset([k.val for k in bench.tasks]),
                     ConcatDataset([k.test for k in bench.tasks]))  # fmt: skip
        result = finetune_task(ctx.backbone, ctx.theta0, every, 0, ctx.finetune, names=ctx.names,
                               progress=ctx.progress, runtime=ctx.runtime)  # fmt: skip
        return ctx.entry(0, result, every.classes)
