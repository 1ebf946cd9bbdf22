r"""ITA (Eq. 11–12) and IEL (Eq. 18–19): the Fisher-regularised methods of the paper.

Per task t, in order (as the official code):

1. **Head pre-tuning** (task pre-consolidation): class statistics of θ0's features, a linear probe
   of a new head, classifier alignment of all heads → the pre-tuned classifier :math:`C_{pre}`,
   anchor of the head penalty.
2. **Fisher at θ0** with :math:`C_{pre}` on the task's training data, accumulated by
   :class:`~compolab.fisher.FisherAccumulator`: ITA uses the mean Fisher of the *previous* tasks,
   IEL the running mean *including* the current one. With ``curvature="kfac"``, one K-FAC per task
   (:mod:`compolab.kfac`) weighted the same way, and no :math:`\epsilon` prior.
3. **Training** of τ_t and h_t (:func:`~compolab.finetune.finetune_task`):

   * ITA: forward θ0 + τ_t, penalty :func:`~compolab.methods.penalties.ita_penalty`;
   * IEL: forward θ0 + (1/T) Σ_{s≤t} τ_s with τ_{s<t} frozen, penalty
     :func:`~compolab.methods.penalties.iel_penalty`, T = t + 1;
   * both: :func:`~compolab.methods.penalties.head_penalty`, :math:`\Delta = h_t - C_{pre}[t]`.

   Applied as the paper's decoupled SGD step for LoRA / (IA)³ and as a loss term (coupled) for full
   fine-tuning, unless ``MethodConfig.decoupled`` says otherwise.
4. Evaluation: θ0 + (1/T) Σ τ_s with the trained heads h_0..h_t.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from compolab.data import make_loader
from compolab.distributed import current_world, owner_of, rank_local
from compolab.errors import ConfigError
from compolab.finetune import finetune_task
from compolab.fisher import DiagonalFisher, FisherAccumulator, diagonal_fisher
from compolab.heads import ClassGaussians, IncrementalHead, new_head, pretune_heads
from compolab.kfac import KFAC, iel_kfac_penalty, kfac_at, kfac_penalty
from compolab.linear_probe import extract_features
from compolab.methods.base import CURVATURES, MergedMethod, TaskContext
from compolab.methods.parallel import share_entry, share_fisher
from compolab.methods.penalties import head_penalty, iel_penalty, ita_penalty, linear_head_fisher
from compolab.methods.state import SecondOrderState, load_second_order_state, save_second_order_state
from compolab.pool import PoolEntry
from compolab.task_vector import uniform_coefs
from compolab.tuning import TaskModule

__all__ = ["ITA", "IEL", "task_fisher"]

FISHER_BATCH = 64  # images per batch of the Fisher pass (memory only: the sum is exact)


def task_fisher(
    ctx: TaskContext, t: int, head: nn.Module, model: nn.Module | None = None, *, kfac: bool = False
) -> DiagonalFisher | KFAC:
    """Fisher of ``head(model(x))`` (default model: θ0) on task t's training data (or a seeded subset).

    Runs on ``ctx.device`` under its autocast (bf16 forward and backward, float32 sums of squares).
    With ``kfac``, its K-FAC instead (:func:`~compolab.kfac.kfac_at`, float32): same images, head and kind.
    """
    data = ctx.bench.tasks[t].train
    gen = torch.Generator().manual_seed(ctx.finetune.seed * 1000 + t)
    n = ctx.cfg.fisher_samples
    if n is not None and n < len(data):
        data = Subset(data, torch.randperm(len(data), generator=gen)[:n].sort().values.tolist())
    cuda = ctx.device.type == "cuda"
    loader = make_loader(data, FISHER_BATCH, num_workers=ctx.runtime.workers if cuda else 0)
    model = ctx.backbone if model is None else model
    head = copy.deepcopy(head).to(ctx.device)  # C_pre stays on the CPU with the class statistics
    if kfac:
        return kfac_at(model, head, loader, ctx.names, fisher_type=ctx.cfg.fisher_kind,
                       mc_samples=ctx.cfg.mc_samples, seed=ctx.finetune.seed * 1000 + t)  # fmt: skip
    with ctx.runtime.autocast_context():
        return diagonal_fisher(model, head, loader, names=ctx.names, kind=ctx.cfg.fisher_kind,
                               top_k=ctx.cfg.fisher_top_k, mc_samples=ctx.cfg.mc_samples, generator=gen,
                               progress=False)  # fmt: skip


def _pretune(ctx: TaskContext, state: SecondOrderState, t: int) -> IncrementalHead:
    """Class statistics and :math:`C_{pre}` for task t (the previous heads, plus a new one)."""
    task, gen = ctx.bench.tasks[t], torch.Generator().manual_seed(ctx.finetune.seed * 1000 + t)
    with ctx.runtime.autocast_context():
        feats, labels = extract_features(ctx.backbone, task.train, device=ctx.device)  # float32, CPU
    state.stats.update(feats, labels)
    heads = list(state.cpre.heads) if state.cpre is not None else []
    classes = list(state.cpre.classes) if state.cpre is not None else []
    heads.append(new_head(feats.shape[1], task.num_classes, generator=gen))
    classes.append(task.classes)
    cpre = IncrementalHead(heads, classes=classes)
    if ctx.cfg.pretune:
        c = ctx.cfg
        cpre = pretune_heads(cpre, state.stats, feats, labels, probe_epochs=c.pretune_epochs,
                             probe_lr=c.pretune_lr, align_epochs=c.align_epochs + 5 * t,
                             align_samples=c.align_samples, seed=ctx.finetune.seed * 1000 + t)  # fmt: skip
    return cpre


@dataclass
class _Prepared:
    """What task t's training needs and what does not depend on any τ_s: C_pre and the Fishers at θ0.

    Attributes:
        cpre: :math:`C_{pre}` after task t's pre-tuning.
        fisher: :math:`f_t`, task t's Fisher at θ0 with :math:`C_{pre}`, or its K-FAC (``curvature="kfac"``);
            None without the backbone penalty.
        cls_fisher: The head penalty's Fisher of head t (CPU).
    """

    cpre: IncrementalHead
    fisher: DiagonalFisher | KFAC | None
    cls_fisher: dict[str, Tensor]


class _SecondOrder(MergedMethod):
    """ITA and IEL: one code path, ``incremental`` tells them apart."""

    incremental: bool = False
    curvatures = CURVATURES  # MethodConfig.curvature values it takes (other methods: "diag" only)

    def new_state(self) -> SecondOrderState:
        return SecondOrderState()

    def _strength(self, ctx: TaskContext) -> float:
        return ctx.cfg.beta if self.incremental else ctx.cfg.alpha

    def _prepare(self, ctx: TaskContext, state: SecondOrderState, t: int, fisher: bool = True) -> _Prepared:
        """Pre-tune C_pre (updates ``state.stats``) and, with ``fisher``, compute f_t at θ0."""
        cfg, iel = ctx.cfg, self.incremental
        cpre = _pretune(ctx, state, t)
        kfac = cfg.curvature == "kfac"
        f_t = task_fisher(ctx, t, cpre, kfac=kfac) if cfg.ablation == "none" and fisher else None
        # head Fisher on synthetic features: ITA classes of tasks 0..t, IEL tasks 0..t-1 (official code)
        seen = [c for cs in cpre.classes[: t if iel else t + 1] for c in cs]
        if seen:
            synth, _ = state.stats.sample(seen, cfg.align_samples, torch.Generator().manual_seed(t))
            cls_fisher = linear_head_fisher(cpre, t, synth)
        else:
            cls_fisher = {
                "weight": torch.zeros_like(cpre.heads[t].weight),
                "bias": torch.zeros_like(cpre.heads[t].bias),
            }
        return _Prepared(cpre, f_t, {k: v + 1e-5 for k, v in cls_fisher.items()})

    def _fit(
        self, ctx: TaskContext, t: int, prep: _Prepared, previous_fisher: DiagonalFisher | None,
        previous_kfacs: Sequence[KFAC] = (),
    ) -> PoolEntry:  # fmt: skip
        """Train τ_t and h_t given the prepared C_pre / Fishers and the Fisher sum (K-FACs) of tasks < t."""
        cfg, task, iel = ctx.cfg, ctx.bench.tasks[t], self.incremental
        dev = ctx.device
        kfac = isinstance(prep.fisher, KFAC)
        backbone_fisher: dict[str, Tensor] | list[KFAC] | None = None
        if kfac:  # one K-FAC per task, weighted by its share of the samples as the accumulator does
            backbone_fisher = [k.to(dev) for k in [*previous_kfacs, *([prep.fisher] if iel else [])]] or None
        elif prep.fisher is not None:  # the backbone penalty (Eq. 12 / 19)
            acc = FisherAccumulator()
            if previous_fisher is not None:
                acc.add_task(previous_fisher.to(dev))
            acc.add_task(prep.fisher.to(dev))
            backbone_fisher = acc.iel(t=acc.num_tasks - 1) if iel else acc.ita(t=acc.num_tasks - 1)
        cls_fisher = {k: v.to(dev) for k, v in prep.cls_fisher.items()}
        strength = self._strength(ctx)
        req = cfg.req_weight_cls if cfg.req_weight_cls is not None else strength
        anchor = copy.deepcopy(prep.cpre.heads[t]).to(dev)
        head_reg = cfg.ablation != "no-reg"
        previous = {n: sum(ctx.taus[s][n] for s in range(t)) for n in ctx.names} if (iel and t) else {}

        def penalty(module: TaskModule, head: nn.Linear) -> Tensor:
            total = head.weight.new_zeros(())
            if backbone_fisher is not None and strength > 0:
                tau = dict(module.delta(ctx.theta0))
                if iel:
                    total = total + (iel_kfac_penalty if kfac else iel_penalty)(
                        tau, previous, backbone_fisher, strength, t)  # fmt: skip
                else:
                    total = total + (kfac_penalty if kfac else ita_penalty)(tau, backbone_fisher, strength)
            if head_reg and req > 0:
                total = total + head_penalty(head, anchor, cls_fisher, req, cfg.simple_reg_weight_cls)
            return total

        decoupled = cfg.decoupled if cfg.decoupled is not None else ctx.finetune.style != "full"
        coefs = uniform_coefs(t + 1)  # IEL's forward: θ0 + (1/T) Σ_{s≤t} τ_s
        result = finetune_task(
            ctx.backbone,
            ctx.theta0,
            task,
            ctx.offset(t),
            ctx.seeded(t),
            names=ctx.names,
            frozen=[ctx.taus[s] for s in range(t)] if iel else [],
            frozen_coefs=coefs[:t] if iel else None,
            coef=coefs[t] if iel else 1.0,
            penalty=penalty,
            decoupled=decoupled,
            progress=ctx.progress,
            runtime=ctx.runtime,
        )
        return ctx.entry(t, result, task.classes, method_cfg=cfg.to_json(), decoupled=decoupled)

    def train(self, ctx: TaskContext, t: int) -> PoolEntry:
        state: SecondOrderState = ctx.state
        if ctx.cfg.curvature == "kfac" and current_world().active:
            raise ConfigError("`curvature` 'kfac' does not run under torchrun: its factors are not shared")
        if self.parallel_ready(ctx):
            return self._train_in_parallel(ctx, t)
        prep = self._prepare(ctx, state, t)
        state.pending = prep.fisher
        entry = self._fit(ctx, t, prep, state.fisher, state.kfacs)
        state.cpre = prep.cpre
        return entry

    def finish(self, ctx: TaskContext, entry: PoolEntry) -> None:
        if entry.task in ctx.ahead:  # trained in parallel: the state a sequential run has after it
            ctx.state = ctx.ahead.pop(entry.task)[1]
        state: SecondOrderState = ctx.state
        if isinstance(state.pending, KFAC):  # no `+`: one K-FAC per task
            state.kfacs.append(state.pending)
        elif state.pending is not None:
            state.fisher = state.pending if state.fisher is None else state.fisher + state.pending
        state.pending = None
        if ctx.state_dir is not None:
            save_second_order_state(ctx.state_dir, state, entry.task)

    def restore(self, ctx: TaskContext, entries: Mapping[int, PoolEntry]) -> None:
        ctx.state = load_second_order_state(ctx.state_dir, max(entries))

    # --- independent modules across ranks (ITA only) ---------------------------------------------

    def parallel_ready(self, ctx: TaskContext) -> bool:
        """True when τ_t of different tasks can train on different ranks at once (ITA under torchrun).

        ITA trains τ_t at θ0 + τ_t: its inputs (C_pre, the class statistics, the Fishers f_s at θ0
        with C_pre[s]) never depend on any τ_s, so they are all computed first and every rank trains
        its own tasks. IEL trains inside θ0 + (1/T) Σ τ_s and its cross term needs Σ_{s<t} τ_s: it
        is sequential, and each of its modules trains data-parallel instead.
        """
        return not self.incremental and current_world().active

    def _train_in_parallel(self, ctx: TaskContext, first: int) -> PoolEntry:
        """Train every task from ``first`` on, task t on rank ``t mod world``, then share them.

        Returns task ``first``'s entry; the others wait in ``ctx.ahead`` for the driver's next calls,
        each with the state a sequential run has after it (:meth:`finish` restores it). On the CPU
        the modules are bit-identical to a sequential run's (same seeds, same operations).
        """
        if first in ctx.ahead:
            return ctx.ahead[first][0]
        world = current_world()
        tasks = [t for t in self.tasks(ctx.bench) if t >= first]
        state: SecondOrderState = ctx.state
        preps: dict[int, _Prepared] = {}
        stats: dict[int, ClassGaussians] = {}
        for t in tasks:  # C_pre in order (cheap, on every rank); f_t on its owner only
            preps[t] = self._prepare(ctx, state, t, fisher=owner_of(t, world) == world.rank)
            state.cpre = preps[t].cpre
            stats[t] = ClassGaussians(dict(state.stats.means), dict(state.stats.variances))
        if ctx.cfg.ablation == "none":
            for t in tasks:
                preps[t].fisher = share_fisher(ctx, preps[t].fisher, owner_of(t, world))
        entries: dict[int, PoolEntry | None] = {}
        previous = ctx.state.fisher  # Σ_{s<t} f_s
        snapshots = {}
        for t in tasks:
            snapshots[t] = SecondOrderState(stats[t], preps[t].cpre, previous, preps[t].fisher)
            if owner_of(t, world) == world.rank:
                with rank_local():  # this rank trains τ_t alone
                    entries[t] = self._fit(ctx, t, preps[t], previous)
            if preps[t].fisher is not None:
                previous = preps[t].fisher if previous is None else previous + preps[t].fisher
        for t in tasks:  # every rank gets every module and head (tensors through the process group)
            entry = share_entry(ctx, t, entries.get(t), preps[t].cpre, owner_of(t, world))
            ctx.ahead[t] = (entry, snapshots[t])
        return ctx.ahead[first][0]


class ITA(_SecondOrder):
    """Incremental Task Arithmetic: each τ_t trained alone at θ0 + τ_t with the penalty of Eq. 11–12."""

    name = "ita"
    label = "ITA"
    editable = True
    ablation_labels = {"no-reg": "ITA without Eq. 12 reg.", "cls-only": "ITA, Eq. 12 only on CLS"}
    incremental = False


class IEL(_SecondOrder):
    """Incremental Ensemble Learning: τ_t trained inside θ0 + (1/T) Σ τ_s with the penalty of Eq. 18–19."""

    name = "iel"
    label = "IEL"
    editable = True
    ablation_labels = {"no-reg": "IEL without Eq. 19 reg.", "cls-only": "IEL, Eq. 19 reg. only on CLS"}
    incremental = True
    #: the released IEL command pairs β with a milder Fisher-weighted head penalty
    preset_overrides = {"tiny": {"req_weight_cls": 1.0}, "paper": {"req_weight_cls": 0.1}}
