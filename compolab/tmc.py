r"""Tangent Model Composition (TMC, Liu & Soatto, ICCV 2023): training, composition, the ensemble baseline.

Per task t, from the **same** θ0 and the **same** random base head:

* the component is a tangent vector: the backbone's τ_t (a :class:`~compolab.tuning.TaskModule`,
  any style) and the base head's tangent :math:`(\Delta W_t, \Delta b_t)`, trained through the
  linearised model :class:`~compolab.linearize.LinearizedModel` with the backbone in eval mode;
* the loss is the rescaled square loss over **all** classes of the benchmark plus an L2-*norm*
  penalty on the trainable tensors (the official code's values):

  .. math:: \frac{1}{BC}\sum_{b,c}\big(f_{lin}(x_b)_c - \kappa\,[y_b = c]\big)^2
            + wd\,\sqrt{10^{-6} + \textstyle\sum_{trainable} p^2},\quad \kappa = 15,\ wd = 10^{-5}

* AdamW (betas 0.9, 0.999, weight decay 0), learning rate ×0.1 at 50 % and 80 % of the epochs
  (the paper's 25 and 40 of 50), in the loop every method shares (:func:`~compolab.finetune.train_loop`).

Evaluation composes the components by uniform averaging of the tangents and runs the
**linearised** composed model (:func:`compose_tmc_pool`), never the non-linear merge. Its baseline,
the output ensemble of non-linearly fine-tuned models, is :class:`OutputEnsemble` (T forwards).

The method of :func:`compolab.run.run` is the thin adapter :mod:`compolab.methods.tangent`. A pool
entry's ``head`` is the head tangent (all classes); the base head is rebuilt from the seed in the
entry's card.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compolab.compose import merge
from compolab.data import Task
from compolab.distributed import train_loader
from compolab.editing import CompositionPlan
from compolab.errors import ConfigError
from compolab.finetune import FinetuneConfig, FinetuneResult, physical_batch, train_loop
from compolab.heads import IncrementalHead
from compolab.linearize import LinearizedModel, TangentComponent, compose_linearized
from compolab.pool import PoolEntry
from compolab.runtime import Runtime
from compolab.task_vector import TaskVector, uniform_coefs
from compolab.tuning import TaskModule

__all__ = [
    "TMCConfig",
    "base_head",
    "scaled_square_loss",
    "norm_penalty",
    "step_factor",
    "train_component",
    "component_of",
    "LogitColumns",
    "compose_tmc_pool",
    "OutputEnsemble",
    "ensemble_predict",
]


@dataclass(frozen=True)
class TMCConfig:
    """TMC's own knobs (defaults: the class-incremental values of the paper's code).

    Attributes:
        kappa: κ of the rescaled square loss (``mse_weight``: 15 class-IL, 5 data-IL).
        wd: Strength of the L2-norm penalty (``wd``: 1e-5).
        milestones: Fractions of the epochs after which the learning rate is multiplied by
            ``gamma`` (paper: 25 and 40 of 50 epochs).
        gamma: The step factor (0.1).
    """

    kappa: float = 15.0
    wd: float = 1e-5
    milestones: tuple[float, ...] = (0.5, 0.8)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if not (self.kappa > 0 and self.wd >= 0 and 0 < self.gamma <= 1):
            raise ConfigError(f"TMCConfig needs kappa > 0, wd >= 0, 0 < gamma <= 1; got {self}")
        if any(not 0 <= m <= 1 for m in self.milestones):
            raise ConfigError(f"TMCConfig.milestones must be fractions in [0, 1], got {self.milestones}")


def base_head(in_features: int, num_classes: int, *, seed: int = 0) -> nn.Linear:
    r"""The frozen random base head shared by every component.

    PyTorch's default ``nn.Linear`` initialisation, :math:`U(-1/\sqrt{D}, 1/\sqrt{D})` for weight and
    bias, drawn from a CPU generator seeded with ``seed``: the same seed gives the same head on any
    machine, so a pool only stores the seed.

    Examples:
        >>> torch.equal(base_head(4, 3, seed=1).weight, base_head(4, 3, seed=1).weight)
        True
    """
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    head = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.empty(num_classes, in_features).uniform_(-bound, bound, generator=gen))
        head.bias.copy_(torch.empty(num_classes).uniform_(-bound, bound, generator=gen))
    return head.requires_grad_(False).eval()


def scaled_square_loss(outputs: Tensor, labels: Tensor, *, kappa: float = 15.0) -> Tensor:
    r"""The rescaled square loss :math:`\mathrm{mean}_{b,c}(o_{bc} - \kappa\,[y_b=c])^2`.

    Args:
        outputs: ``(B, C)``, one column per class of the benchmark (all of them).
        labels: ``(B,)`` global labels.
        kappa: The target scale κ.

    Returns:
        The mean over batch and classes.

    Examples:
        >>> scaled_square_loss(torch.zeros(1, 3), torch.tensor([0]), kappa=15.0)  # 15² / 3
        tensor(75.)
    """
    target = kappa * F.one_hot(labels, outputs.shape[-1]).to(outputs.dtype)
    return F.mse_loss(outputs, target)


def norm_penalty(params: Sequence[Tensor], *, wd: float = 1e-5, eps: float = 1e-6) -> Tensor:
    r"""The L2 *norm* (not squared) penalty :math:`wd\,\sqrt{\epsilon + \sum_p \sum p^2}`.

    Examples:
        >>> float(norm_penalty([torch.tensor([3.0]), torch.tensor([4.0])], wd=2.0, eps=0.0))
        10.0
    """
    return wd * torch.sqrt(eps + sum(p.square().sum() for p in params))


def step_factor(
    epoch: int, epochs: int, milestones: Sequence[float] = (0.5, 0.8), gamma: float = 0.1
) -> float:
    r"""Learning-rate factor of epoch ``epoch`` (0-based) of ``epochs`` = K.

    .. math:: \gamma^{\#\{m:\ epoch \ge \lceil m K\rceil\}}

    With K = 50 epochs the milestones are 25 and 40 (the paper's schedule).

    Examples:
        >>> [step_factor(e, 50) for e in (24, 25, 39, 40)] == [1.0, 0.1, 0.1, 0.1 ** 2]
        True
        >>> step_factor(0, 1)  # a single epoch keeps the full learning rate
        1.0
    """
    return gamma ** sum(epoch >= math.ceil(m * epochs - 1e-9) for m in milestones)


def train_component(
    backbone: nn.Module,
    theta0: dict[str, Tensor],
    task: Task,
    head: nn.Module,
    cfg: FinetuneConfig | None = None,
    tmc: TMCConfig = TMCConfig(),
    *,
    names: Sequence[str],
    module: TaskModule | None = None,
    progress: bool | None = False,
    runtime: Runtime | str | torch.device | None = None,
) -> FinetuneResult:
    r"""Train one TMC component on one task through the linearised model.

    Args:
        backbone: θ0 (frozen, eval mode: BatchNorm uses its running statistics).
        theta0: θ0's named parameters.
        task: The task; labels are global, and the loss covers every output of ``head``.
        head: The shared frozen base head, ``D → C`` with C = all classes of the benchmark.
        cfg: Style, rank, epochs, batch size, accumulation, lr (paper: 1e-4), AdamW weight decay
            (paper: 0), seed; default ``FinetuneConfig()``.
        tmc: κ, the norm-penalty strength and the step schedule.
        names: Target weights of the module.
        module: Start from this module (default: a fresh one, τ = 0).
        progress: Show a progress bar.
        runtime: Device, autocast, physical batch, loader workers (:class:`~compolab.runtime.Runtime`),
            or a device (float32 there); default the CPU.

    Returns:
        The trained module, the head tangent as an ``nn.Linear`` (weight ΔW, bias Δb), the
        per-epoch history (loss, penalty, train accuracy over all classes) and the time.

    Raises:
        TrainingDiverged: If a loss becomes NaN or infinite.
    """
    t0 = time.time()
    cfg = cfg if cfg is not None else FinetuneConfig()
    runtime = Runtime.of(runtime)
    gen = torch.Generator().manual_seed(cfg.seed)
    if module is None:
        module = TaskModule.create(cfg.style, theta0, names, rank=cfg.rank, generator=gen)
    model = LinearizedModel(backbone, theta0, module=module, head=head).to(runtime.device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # module + head tangent
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    loader = train_loader(task.train, physical_batch(cfg, runtime), seed=cfg.seed, runtime=runtime)
    history = train_loop(
        model, opt, loader, cfg,
        loss_fn=partial(scaled_square_loss, kappa=tmc.kappa),  # (B, C): every class of the benchmark
        lr_factor=partial(step_factor, milestones=tmc.milestones, gamma=tmc.gamma),
        penalty=lambda: norm_penalty(trainable, wd=tmc.wd),
        desc=f"tmc task {task.index}", progress=progress, runtime=runtime,
    )  # fmt: skip
    module.eval()
    return FinetuneResult(module, _linear_of(model.component().head), history, time.time() - t0)


def _linear_of(delta: TaskVector) -> nn.Linear:
    """The head tangent as an ``nn.Linear`` (what a pool entry stores as its head)."""
    out_features, in_features = delta["weight"].shape
    linear = nn.Linear(in_features, out_features).to(delta["weight"])
    with torch.no_grad():
        linear.weight.copy_(delta["weight"])
        linear.bias.copy_(delta["bias"])
    return linear.requires_grad_(False)


def component_of(entry: PoolEntry, theta0: Mapping[str, Tensor]) -> TangentComponent:
    """A pool entry of a TMC run as a :class:`~compolab.linearize.TangentComponent`, on θ0's device.

    (Entries read back from disk live on the CPU; θ0 may not.)
    """
    like = next(iter(theta0.values()))
    at = next(entry.module.parameters())  # where the module's tensors are
    tau = entry.module.delta({n: theta0[n].to(at.device) for n in entry.module.names})
    head = TaskVector({"weight": entry.head.weight.detach(), "bias": entry.head.bias.detach()})
    return TangentComponent(tau.detach().to(like.device), head.to(like.device))


class LogitColumns(nn.Module):
    """The logits of ``classes`` picked out of a full-size output: a member of an
    :class:`~compolab.heads.IncrementalHead` over a TMC model's logits (every class)."""

    def __init__(self, classes: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor(list(classes), dtype=torch.long))
        self.out_features = len(classes)

    def forward(self, logits: Tensor) -> Tensor:
        return logits[:, self.index]


def _base_head_of(entries: Mapping[int, PoolEntry], like: Tensor) -> nn.Linear:
    """The base head of a TMC pool, rebuilt from the seed in its cards, on ``like``'s device."""
    seeds = {e.card.get("hparams", {}).get("tmc", {}).get("base_head_seed") for e in entries.values()}
    if len(seeds) != 1 or None in seeds:
        raise ConfigError(f"TMC entries must share one base-head seed in their cards, got {seeds}")
    any_head = next(iter(entries.values())).head
    head = base_head(any_head.in_features, any_head.out_features, seed=seeds.pop())
    return head.to(device=like.device, dtype=any_head.weight.dtype)


def compose_tmc_pool(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    entries: Mapping[int, PoolEntry],
    plan: CompositionPlan,
) -> tuple[nn.Module, IncrementalHead]:
    r"""The linearised composition of a TMC pool, with a head over the composed tasks' classes.

    The counterpart of :func:`compolab.editing.compose_pool` for TMC: the model is
    :func:`~compolab.linearize.compose_linearized` at :math:`\sum_t w_t \tau_t - \gamma\sum_k
    \tau_k` (one linearised forward), and the predictions run over the classes of ``plan.tasks``
    only (class-incremental, as every method of the kit).

    Returns:
        ``(model, head)`` for :func:`compolab.evaluate.evaluate_tasks`: ``model`` outputs the
        linearised logits of every class, ``head`` selects the composed tasks' columns.
    """
    used = plan.tasks + plan.negated
    missing = [t for t in used if t not in entries]
    if missing:
        raise ConfigError(f"task(s) {missing} are planned but not loaded")
    components = {t: component_of(entries[t], theta0) for t in sorted(used)}
    weight = dict(zip(plan.tasks, plan.coefs, strict=True))
    weight |= {t: -c for t, c in zip(plan.negated, plan.negated_coefs, strict=True)}
    coefs = [weight[t] for t in components]  # compose_linearized takes them in id order
    like = next(iter(theta0.values()))
    base = _base_head_of({t: entries[t] for t in used}, like)
    model = compose_linearized(backbone, components, coefs, theta0=theta0, head=base)
    head = IncrementalHead([LogitColumns(entries[t].classes) for t in plan.tasks], tasks=plan.tasks,
                           classes=[entries[t].classes for t in plan.tasks])  # fmt: skip
    return model, head.to(like.device)


class OutputEnsemble(nn.Module):
    r"""Output ensemble of non-linearly fine-tuned models: :math:`\sum_i w_i h_i(f(x;\theta_0+\tau_i))`.

    TMC's baseline (Liu & Soatto, Fig. 1b): each member is θ0 + τ_i merged into its own copy of the
    backbone, so inference costs T forwards.

    Args:
        backbone: θ0's model (not modified).
        theta0: θ0's named parameters.
        taus: The members' task vectors.
        coefs: Their weights; default :math:`1/T` each.
        heads: One head per member (or one shared head); default none (features are averaged).
    """

    def __init__(
        self,
        backbone: nn.Module,
        theta0: Mapping[str, Tensor],
        taus: Sequence[TaskVector],
        coefs: Sequence[float] | None = None,
        *,
        heads: Sequence[nn.Module] | nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not taus:
            raise ConfigError("an ensemble needs at least one member")
        self.coefs = uniform_coefs(len(taus)) if coefs is None else list(coefs)
        if len(self.coefs) != len(taus):
            raise ConfigError(f"got {len(self.coefs)} coefs for {len(taus)} members")
        self.members = nn.ModuleList([merge(backbone, theta0, [tau], [1.0]).eval() for tau in taus])
        if isinstance(heads, nn.Module):
            heads = [heads] * len(taus)
        if heads is not None and len(heads) != len(taus):
            raise ConfigError(f"got {len(heads)} heads for {len(taus)} members")
        self.heads = nn.ModuleList(heads) if heads is not None else None

    def forward(self, x: Tensor) -> Tensor:
        out = 0
        for i, (c, member) in enumerate(zip(self.coefs, self.members, strict=True)):
            y = member(x)
            out = out + c * (self.heads[i](y) if self.heads is not None else y)
        return out


@torch.no_grad()
def ensemble_predict(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    taus: Sequence[TaskVector],
    x: Tensor,
    coefs: Sequence[float] | None = None,
    *,
    heads: Sequence[nn.Module] | nn.Module | None = None,
) -> Tensor:
    """Averaged outputs of the non-linear models θ0 + τ_i on ``x`` (T forwards; :class:`OutputEnsemble`).

    Builds the merged members on every call: keep an :class:`OutputEnsemble` to predict repeatedly.
    """
    return OutputEnsemble(backbone, theta0, taus, coefs, heads=heads)(x)
