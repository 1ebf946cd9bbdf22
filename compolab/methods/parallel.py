"""Modules trained on different ``torchrun`` ranks, shared with every rank through the process group.

ITA trains each τ_t on its own rank (:meth:`compolab.methods.ita_iel.ITA.parallel_ready`); these
helpers send a task's Fisher at θ0 and its trained module, head and history from the rank that
computed them to every other rank, as tensors (nothing is pickled), so that rank 0 saves and
evaluates them as if it had trained them itself.
"""

from __future__ import annotations

import torch
from torch import nn

from compolab.distributed import broadcast_tensors
from compolab.finetune import FinetuneResult
from compolab.fisher_store import DiagonalFisher
from compolab.heads import IncrementalHead
from compolab.methods.base import TaskContext
from compolab.pool import PoolEntry
from compolab.tuning import TaskModule

__all__ = ["share_fisher", "share_entry"]


def share_fisher(ctx: TaskContext, fisher: DiagonalFisher | None, owner: int) -> DiagonalFisher:
    """The owner's Fisher of one task on every rank (its sample count too)."""
    if fisher is None:
        values = {n: torch.zeros_like(ctx.theta0[n]) for n in ctx.names}
        count = torch.zeros(1, dtype=torch.float64)
    else:
        values, count = fisher.values, torch.tensor([float(fisher.num_samples)], dtype=torch.float64)
    shared = broadcast_tensors({**values, "::num_samples": count}, src=owner)
    return DiagonalFisher({n: shared[n] for n in values}, int(shared["::num_samples"].item()))


def share_entry(
    ctx: TaskContext, t: int, entry: PoolEntry | None, cpre: IncrementalHead, owner: int
) -> PoolEntry:
    """The owner's trained module, head and history of task t on every rank."""
    task, ft = ctx.bench.tasks[t], ctx.finetune
    if entry is None:
        gen = torch.Generator(device=ctx.device).manual_seed(0)
        module = TaskModule.create(ft.style, ctx.theta0, ctx.names, rank=ft.rank, generator=gen)
        head = nn.Linear(cpre.heads[t].in_features, task.num_classes).to(ctx.device)
        history, seconds = torch.zeros(ft.epochs, 4, dtype=torch.float64), 0.0
    else:
        module, head = entry.module, entry.head
        metrics = entry.card["metrics"]
        rows = [[h["epoch"], h["loss"], h["penalty"], h["train_accuracy"]] for h in metrics["history"]]
        history, seconds = torch.tensor(rows, dtype=torch.float64), metrics["seconds"]
    tensors = {**{f"module::{k}": v for k, v in module.state_tensors().items()},
               "head::weight": head.weight.detach(), "head::bias": head.bias.detach(),
               "history": history,
               "seconds": torch.tensor([float(seconds)], dtype=torch.float64)}  # fmt: skip
    shared = broadcast_tensors(tensors, src=owner)
    if entry is not None:
        return entry
    prefix = "module::"
    module = TaskModule.from_state_tensors(
        ft.style, ctx.names, {k[len(prefix) :]: v for k, v in shared.items() if k.startswith(prefix)}
    ).to(ctx.device)
    with torch.no_grad():
        head.weight.copy_(shared["head::weight"])
        head.bias.copy_(shared["head::bias"])
    keys = ("epoch", "loss", "penalty", "train_accuracy")
    hist = [dict(zip(keys, row, strict=True)) for row in shared["history"].tolist()]
    for h in hist:
        h["epoch"] = int(h["epoch"])
    result = FinetuneResult(module.eval(), head, hist, float(shared["seconds"].item()))
    decoupled = ctx.cfg.decoupled if ctx.cfg.decoupled is not None else ft.style != "full"
    return ctx.entry(t, result, task.classes, method_cfg=ctx.cfg.to_json(), decoupled=decoupled)
