r"""ITA, IEL and the EWC baseline: the Fisher-regularised methods (spec §A.3–A.6).

Per task t, in order (spec §A.3.3):

1. **Head pre-tuning** (task pre-consolidation, §A.6): class statistics of θ0's features, a linear
   probe of a new head, classifier alignment of all heads → the pre-tuned classifier
   :math:`C_{pre}`, anchor of the head penalty.
2. **Fisher at θ0** with :math:`C_{pre}` on the task's training data (§A.5), accumulated by
   :class:`~compolab.fisher.FisherAccumulator`: ITA uses the mean Fisher of the *previous* tasks,
   IEL the running mean *including* the current one.
3. **Training** of τ_t and h_t (:func:`~compolab.finetune.finetune_task`):

   * ITA (Eq. 11–12): forward θ0 + τ_t, penalty
     :math:`\frac{\alpha}{2}\sum_i \bar F^{(i)}_{<t}\,(\Delta W_t^{(i)})^2`;
   * IEL (Eq. 18–19): forward θ0 + (1/T) Σ_{s≤t} τ_s with τ_{s<t} frozen, penalty
     :math:`\beta\,[\tfrac12(1-\tfrac1T)\sum_i \bar F^{(i)} (\tau_t^{(i)})^2
     - \tfrac1T \sum_i \bar F^{(i)} \tau_t^{(i)} \sum_{s<t}\tau_s^{(i)}]`, T = t + 1 (T := 2 in the
     penalty at t = 0, as the official code);
   * both: the head penalty :math:`\lambda_F \sum F_{cls} \Delta^2 + \lambda_2 \sum \Delta^2`,
     :math:`\Delta = h_t - C_{pre}[t]`.

   Applied as the paper's decoupled SGD step for LoRA / (IA)³ and as a loss term (coupled) for full
   fine-tuning (§A.3.2 item 7, §A.11.1), unless ``MethodConfig.decoupled`` says otherwise.
4. Evaluation: θ0 + (1/T) Σ τ_s with the trained heads h_0..h_t.

**EWC** (baseline): sequential fine-tuning (forward θ_{t-1} + τ_t) with
:math:`\frac{\lambda}{2}\sum_i F^{(i)} (\tau_t^{(i)})^2`, F the sum of the Fishers of the previous
tasks each taken at the weights learned on it — the anchor shifts to the previous task, where ITA's
stays at θ0 (§A.2.4).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Subset

from compolab.compose import merge
from compolab.data import make_loader
from compolab.errors import CompolabError
from compolab.finetune import finetune_task
from compolab.fisher import DiagonalFisher, FisherAccumulator, diagonal_fisher
from compolab.heads import ClassGaussians, IncrementalHead, new_head, pretune_heads
from compolab.linear_probe import extract_features
from compolab.methods import TaskContext, _entry, _seeded, register
from compolab.pool import PoolEntry
from compolab.tuning import TaskModule

__all__ = ["ita_penalty", "iel_penalty", "head_penalty", "linear_head_fisher", "saved_fisher"]

FISHER_BATCH = 64  # images per batch of the Fisher pass (memory only: the sum is exact)


# --------------------------------------------------------------------------- penalties


def ita_penalty(delta: dict[str, Tensor], fisher: dict[str, Tensor], alpha: float) -> Tensor:
    r"""ITA's penalty (Eq. 11–12): :math:`\frac{\alpha}{2}\sum_i \bar F^{(i)} (\Delta W_t^{(i)})^2`.

    Its gradient, :math:`\alpha \bar F \odot \Delta W_t`, is the official code's (spec §A.3.2.5).

    Examples:
        >>> import torch
        >>> ita_penalty({"w": torch.tensor([2.0])}, {"w": torch.tensor([3.0])}, alpha=0.5)
        tensor(3.)
    """
    return 0.5 * alpha * sum((fisher[n] * d.square()).sum() for n, d in delta.items())


def iel_penalty(
    delta: dict[str, Tensor], previous_sum: dict[str, Tensor], fisher: dict[str, Tensor], beta: float, t: int
) -> Tensor:
    r"""IEL's penalty (Eq. 18–19, spec §A.4.1), with T = t + 1 (T := 2 at t = 0).

    .. math:: \beta\Big[\tfrac12\big(1-\tfrac1T\big)\sum_i \bar F^{(i)} (\tau_t^{(i)})^2
              - \tfrac1T \sum_i \bar F^{(i)} \tau_t^{(i)} \sum_{s<t}\tau_s^{(i)}\Big]

    Its gradient is β·T·∂Ω/∂τ_t, Ω the Jensen gap of spec §A.2.3 with H → F̄.

    Examples:
        >>> import torch
        >>> d, s, f = {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}
        >>> iel_penalty(d, s, f, beta=1.0, t=1)  # 0.5 * 0.5 * 4 - 0.5 * 2
        tensor(0.)
    """
    T = 2 if t == 0 else t + 1
    self_term = sum((fisher[n] * d.square()).sum() for n, d in delta.items())
    cross = sum((fisher[n] * d * previous_sum[n]).sum() for n, d in delta.items() if n in previous_sum)
    return beta * (0.5 * (1 - 1 / T) * self_term - cross / T)


def head_penalty(
    head: nn.Linear, anchor: nn.Linear, fisher: dict[str, Tensor], req: float, simple: float
) -> Tensor:
    r"""The head penalty (spec §A.6): :math:`\lambda_F \sum F_{cls} \Delta^2 + \lambda_2 \sum \Delta^2`.

    :math:`\Delta` = head − pre-tuned head, weight and bias; no ½ (as the official code).
    """
    total = head.weight.new_zeros(())
    for name in ("weight", "bias"):
        diff = getattr(head, name) - getattr(anchor, name).detach()
        total = total + req * (fisher[name] * diff.square()).sum() + simple * diff.square().sum()
    return total


@torch.no_grad()
def linear_head_fisher(head: IncrementalHead, index: int, features: Tensor) -> dict[str, Tensor]:
    r"""Exact Fisher (mean per example) of head ``index``'s weight and bias on ``features``.

    For a linear softmax head the true Fisher has a closed form: row j of the weight gets
    :math:`\mathbb E_x[p_j(1-p_j)\, x^{\odot 2}]` and its bias :math:`\mathbb E_x[p_j(1-p_j)]`
    (since :math:`\sum_c p_c (\mathbb 1[c=j]-p_j)^2 = p_j(1-p_j)`), with p the softmax over every
    class of ``head``. Checked against :func:`~compolab.fisher.diagonal_fisher` in the tests.
    """
    p = head(features).softmax(-1)
    start = sum(h.out_features for h in head.heads[:index])
    q = p[:, start : start + head.heads[index].out_features]
    w = q * (1 - q)  # (N, classes of the head)
    return {"weight": w.T @ features.square() / len(features), "bias": w.mean(0)}


# --------------------------------------------------------------------------- state


def _state_paths(ctx: TaskContext) -> tuple[Path, Path]:
    folder = Path(ctx.state["dir"])
    return folder / "state.safetensors", folder / "state.json"


def _save_state(ctx: TaskContext, t: int) -> None:
    """Everything a resumed run needs after task t: class statistics, C_pre, Fisher sums."""
    if "dir" not in ctx.state:
        return
    tensors: dict[str, Tensor] = {}
    stats: ClassGaussians = ctx.state["stats"]
    for c in stats.means:
        tensors[f"stats::{c}::mean"] = stats.means[c]
        tensors[f"stats::{c}::var"] = stats.variances[c]
    for i, h in enumerate(ctx.state["cpre"].heads):
        tensors[f"cpre::{i}::weight"] = h.weight.detach()
        tensors[f"cpre::{i}::bias"] = h.bias.detach()
    for n, v in ctx.state.get("fisher_sum", {}).items():
        tensors[f"fisher::{n}"] = v
    for n, v in ctx.state.get("ewc_fisher", {}).items():
        tensors[f"ewc::{n}"] = v
    path, meta = _state_paths(ctx)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".state.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    info = {"after_task": t, "fisher_count": ctx.state.get("fisher_count", 0),
            "cpre_classes": [list(c) for c in ctx.state["cpre"].classes]}  # fmt: skip
    meta.write_text(json.dumps(info) + "\n")


def saved_fisher(folder: str | Path) -> DiagonalFisher | None:
    """The running sum of the tasks' diagonal Fishers that an ITA / IEL run keeps in its ``state/``
    folder (``folder``), or None when the run kept none (e.g. ``ablation="no-reg"``)."""
    path, meta = Path(folder) / "state.safetensors", Path(folder) / "state.json"
    if not path.exists() or not meta.exists():
        return None
    count = json.loads(meta.read_text()).get("fisher_count", 0)
    values = {k.split("::", 1)[1]: v for k, v in load_file(str(path)).items() if k.startswith("fisher::")}
    return DiagonalFisher(values, count) if values and count else None


def _load_state(ctx: TaskContext, t: int) -> None:
    path, meta = _state_paths(ctx)
    info = json.loads(meta.read_text()) if meta.exists() else {}
    if info.get("after_task") != t:
        raise CompolabError(f"cannot resume: {path} does not hold the state after task {t}")
    tensors = load_file(str(path))
    stats = ClassGaussians()
    for key, v in tensors.items():
        kind, *rest = key.split("::")
        if kind == "stats":
            (stats.means if rest[1] == "mean" else stats.variances)[int(rest[0])] = v
    heads = []
    for i, classes in enumerate(info["cpre_classes"]):
        h = nn.Linear(tensors[f"cpre::{i}::weight"].shape[1], len(classes))
        h.load_state_dict({"weight": tensors[f"cpre::{i}::weight"], "bias": tensors[f"cpre::{i}::bias"]})
        heads.append(h.requires_grad_(False))
    ctx.state["stats"] = stats
    ctx.state["cpre"] = IncrementalHead(heads, classes=info["cpre_classes"])
    fisher = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("fisher::")}
    if fisher:
        ctx.state["fisher_sum"], ctx.state["fisher_count"] = fisher, info["fisher_count"]
    ewc = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("ewc::")}
    if ewc:
        ctx.state["ewc_fisher"] = ewc


# --------------------------------------------------------------------------- ITA / IEL


def _backbone_reg(ctx: TaskContext) -> bool:
    return ctx.cfg.ablation == "none"


def _head_reg(ctx: TaskContext) -> bool:
    return ctx.cfg.ablation != "no-reg"


def _pretune(ctx: TaskContext, t: int) -> tuple[IncrementalHead, Tensor]:
    """Class statistics and C_pre for task t; returns C_pre and θ0's features of the task."""
    task, gen = ctx.bench.tasks[t], torch.Generator().manual_seed(ctx.finetune.seed * 1000 + t)
    feats, labels = extract_features(ctx.backbone, task.train, device=ctx.device)
    ctx.state.setdefault("stats", ClassGaussians()).update(feats, labels)
    prev: IncrementalHead | None = ctx.state.get("cpre")
    heads = list(prev.heads) if prev is not None else []
    classes = list(prev.classes) if prev is not None else []
    heads.append(new_head(feats.shape[1], task.num_classes, generator=gen))
    classes.append(task.classes)
    cpre = IncrementalHead(heads, classes=classes)
    if ctx.cfg.pretune:
        c = ctx.cfg
        cpre = pretune_heads(cpre, ctx.state["stats"], feats, labels, probe_epochs=c.pretune_epochs,
                             probe_lr=c.pretune_lr, align_epochs=c.align_epochs + 5 * t,
                             align_samples=c.align_samples, seed=ctx.finetune.seed * 1000 + t)  # fmt: skip
    return cpre, feats


def _task_fisher(
    ctx: TaskContext, t: int, head: IncrementalHead, model: nn.Module | None = None
) -> DiagonalFisher:
    """Fisher of ``head(model(x))`` (default model: θ0) on task t's training data (or a subset)."""
    data = ctx.bench.tasks[t].train
    gen = torch.Generator().manual_seed(ctx.finetune.seed * 1000 + t)
    n = ctx.cfg.fisher_samples
    if n is not None and n < len(data):
        data = Subset(data, torch.randperm(len(data), generator=gen)[:n].sort().values.tolist())
    loader = make_loader(data, FISHER_BATCH)
    model = ctx.backbone if model is None else model
    return diagonal_fisher(model, head, loader, names=ctx.names, kind=ctx.cfg.fisher_kind,
                           top_k=ctx.cfg.fisher_top_k, mc_samples=ctx.cfg.mc_samples, generator=gen,
                           progress=False)  # fmt: skip


def _accumulator(ctx: TaskContext) -> FisherAccumulator:
    acc = FisherAccumulator()
    if ctx.state.get("fisher_count"):
        acc.add_task(DiagonalFisher(dict(ctx.state["fisher_sum"]), ctx.state["fisher_count"]))
    return acc


def _train_regularised(ctx: TaskContext, t: int) -> PoolEntry:
    iel = ctx.method == "iel"
    cfg, task = ctx.cfg, ctx.bench.tasks[t]
    cpre, feats = _pretune(ctx, t)
    backbone_fisher: dict[str, Tensor] | None = None
    if _backbone_reg(ctx):
        f_t = _task_fisher(ctx, t, cpre)
        acc = _accumulator(ctx)
        acc.add_task(f_t)
        backbone_fisher = acc.iel(t=acc.num_tasks - 1) if iel else acc.ita(t=acc.num_tasks - 1)
        ctx.state["pending_fisher"] = f_t
    # head Fisher on synthetic features: ITA classes of tasks 0..t, IEL tasks 0..t-1 (spec §A.5.7)
    seen = [c for cs in cpre.classes[: t if iel else t + 1] for c in cs]
    if seen:
        synth, _ = ctx.state["stats"].sample(seen, cfg.align_samples, torch.Generator().manual_seed(t))
        cls_fisher = linear_head_fisher(cpre, t, synth)
    else:
        cls_fisher = {
            "weight": torch.zeros_like(cpre.heads[t].weight),
            "bias": torch.zeros_like(cpre.heads[t].bias),
        }
    cls_fisher = {k: v + 1e-5 for k, v in cls_fisher.items()}
    req = cfg.req_weight_cls if cfg.req_weight_cls is not None else (cfg.beta if iel else cfg.alpha)
    anchor = cpre.heads[t]
    T = t + 1
    previous_sum = {n: sum(ctx.taus[s][n] for s in range(t)) for n in ctx.names} if (iel and t) else {}
    strength = cfg.beta if iel else cfg.alpha

    def penalty(module: TaskModule, head: nn.Linear) -> Tensor:
        total = head.weight.new_zeros(())
        if backbone_fisher is not None and strength > 0:
            delta = dict(module.delta(ctx.theta0))
            if iel:
                total = total + iel_penalty(delta, previous_sum, backbone_fisher, strength, t)
            else:
                total = total + ita_penalty(delta, backbone_fisher, strength)
        if _head_reg(ctx) and req > 0:
            total = total + head_penalty(head, anchor, cls_fisher, req, cfg.simple_reg_weight_cls)
        return total

    decoupled = cfg.decoupled if cfg.decoupled is not None else ctx.finetune.style != "full"
    frozen = [ctx.taus[s] for s in range(t)] if iel else []
    result = finetune_task(
        ctx.backbone,
        ctx.theta0,
        task,
        ctx.offset(t),
        _seeded(ctx.finetune, t),
        names=ctx.names,
        frozen=frozen,
        frozen_coefs=[1 / T] * t if iel else None,
        coef=1 / T if iel else 1.0,
        penalty=penalty,
        decoupled=decoupled,
        progress=ctx.progress,
        device=ctx.device,
    )
    ctx.state["cpre"] = cpre
    return _entry(ctx, t, result, task.classes, method_cfg=cfg.__dict__, decoupled=decoupled)


def _finish_regularised(ctx: TaskContext, entry: PoolEntry) -> None:
    f_t: DiagonalFisher | None = ctx.state.pop("pending_fisher", None)
    if f_t is not None:
        total = ctx.state.get("fisher_sum")
        ctx.state["fisher_sum"] = (
            dict(f_t.values) if total is None else {n: total[n] + f_t.values[n] for n in total}
        )
        ctx.state["fisher_count"] = ctx.state.get("fisher_count", 0) + f_t.num_samples
    _save_state(ctx, entry.task)


def _restore(ctx: TaskContext, entries: dict[int, PoolEntry]) -> None:
    """Reload the state saved after the last finished task (``--resume``)."""
    _load_state(ctx, max(entries))
    if ctx.method == "ewc":
        ctx.state["heads"] = [entries[s].head for s in sorted(entries)]


# --------------------------------------------------------------------------- EWC


def _train_ewc(ctx: TaskContext, t: int) -> PoolEntry:
    task = ctx.bench.tasks[t]
    fisher = ctx.state.get("ewc_fisher")
    lam = ctx.cfg.ewc_lambda

    def penalty(module: TaskModule, head: nn.Linear) -> Tensor:
        if fisher is None or lam == 0:
            return head.weight.new_zeros(())
        return ita_penalty(dict(module.delta(ctx.theta0)), fisher, lam)

    result = finetune_task(ctx.backbone, ctx.theta0, task, ctx.offset(t), _seeded(ctx.finetune, t),
                           names=ctx.names, frozen=[ctx.taus[s] for s in range(t)], frozen_coefs=[1.0] * t,
                           penalty=penalty, progress=ctx.progress, device=ctx.device)  # fmt: skip
    return _entry(ctx, t, result, task.classes, ewc_lambda=lam)


def _finish_ewc(ctx: TaskContext, entry: PoolEntry) -> None:
    """Add task t's Fisher, at the weights learned on it, to the EWC penalty."""
    t = entry.task
    model = merge(ctx.backbone, ctx.theta0, [ctx.taus[s] for s in range(t + 1)], [1.0] * (t + 1))
    heads = ctx.state.setdefault("heads", [])
    heads.append(entry.head)
    head = IncrementalHead(heads, classes=[ctx.bench.tasks[s].classes for s in range(t + 1)])
    mean = _task_fisher(ctx, t, head, model).mean()
    old = ctx.state.get("ewc_fisher")
    ctx.state["ewc_fisher"] = mean if old is None else {n: old[n] + mean[n] for n in mean}
    ctx.state.setdefault("stats", ClassGaussians())
    ctx.state["cpre"] = head
    _save_state(ctx, t)


register("ita", _train_regularised, _finish_regularised, _restore)
register("iel", _train_regularised, _finish_regularised, _restore)
register("ewc", _train_ewc, _finish_ewc, _restore)
