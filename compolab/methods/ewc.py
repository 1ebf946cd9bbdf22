r"""The EWC baseline: sequential fine-tuning with an EWC penalty anchored at the previous weights.

Task t trains τ_t at θ_{t-1} + τ_t (θ_{t-1} = θ0 + Σ_{s<t} τ_s, frozen) with
:math:`\frac{\alpha}{2}\sum_i F^{(i)} (\tau_t^{(i)})^2` (:func:`~compolab.methods.penalties.ita_penalty`;
EWC's own paper calls the strength λ), F the sum of the previous tasks' mean Fishers, each taken at
the weights learned on that task: the anchor moves with the tasks, where ITA's stays at θ0.
Evaluation: θ0 + Σ τ_s.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from compolab.compose import merge
from compolab.finetune import finetune_task
from compolab.heads import IncrementalHead
from compolab.methods.base import MergedMethod, TaskContext
from compolab.methods.ita_iel import task_fisher
from compolab.methods.penalties import ita_penalty
from compolab.methods.state import EWCState, load_ewc_state, save_ewc_state
from compolab.pool import PoolEntry
from compolab.tuning import TaskModule

__all__ = ["EWC"]


class EWC(MergedMethod):
    """Elastic weight consolidation on top of sequential fine-tuning (a baseline)."""

    name = "ewc"
    label = "EWC"

    def new_state(self) -> EWCState:
        return EWCState()

    def eval_coefs(self, num_tasks: int) -> list[float]:
        return [1.0] * num_tasks

    def train(self, ctx: TaskContext, t: int) -> PoolEntry:
        task, fisher, lam = ctx.bench.tasks[t], ctx.state.fisher, ctx.cfg.ewc_lambda

        def penalty(module: TaskModule, head: nn.Linear) -> Tensor:
            if fisher is None or lam == 0:
                return head.weight.new_zeros(())
            return ita_penalty(dict(module.delta(ctx.theta0)), fisher, lam)

        result = finetune_task(ctx.backbone, ctx.theta0, task, ctx.offset(t), ctx.seeded(t),
                               names=ctx.names, frozen=[ctx.taus[s] for s in range(t)],
                               frozen_coefs=[1.0] * t, penalty=penalty, progress=ctx.progress,
                               runtime=ctx.runtime)  # fmt: skip
        return ctx.entry(t, result, task.classes, ewc_lambda=lam)

    def finish(self, ctx: TaskContext, entry: PoolEntry) -> None:
        """Add task t's mean Fisher, at the weights learned on it, to the penalty."""
        state: EWCState = ctx.state
        t = entry.task
        model = merge(ctx.backbone, ctx.theta0, [ctx.taus[s] for s in range(t + 1)], [1.0] * (t + 1))
        state.heads.append(entry.head)
        head = IncrementalHead(state.heads, classes=[ctx.bench.tasks[s].classes for s in range(t + 1)])
        mean = task_fisher(ctx, t, head, model).mean()
        state.fisher = mean if state.fisher is None else {n: state.fisher[n] + mean[n] for n in mean}
        if ctx.state_dir is not None:
            save_ewc_state(ctx.state_dir, state, t)

    def restore(self, ctx: TaskContext, entries: Mapping[int, PoolEntry]) -> None:
        heads = [entries[s].head for s in sorted(entries)]
        ctx.state = load_ewc_state(ctx.state_dir, max(entries), heads)
