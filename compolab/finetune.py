"""Fine-tuning of one task's module τ_t and head h_t, alone or inside the composed model.

This is the plain loop every method shares: a forward at θ0 + Σ_s w_s τ_s (frozen, pre-merged) +
w·τ_t (trainable), the current head on top, cross-entropy over the current task's classes only
(the logits of past classes masked out, spec §A.3.2 item 1), AdamW with the paper's per-epoch
cosine factor (spec §A.8), and an optional penalty added to the loss (autograd differentiates it).
ITA, IEL and the baselines (``compolab.methods``) choose what is frozen, the weights and the
penalty.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compolab.compose import ComposedForward
from compolab.data import Task, make_loader
from compolab.errors import CompolabError, ConfigError
from compolab.heads import new_head
from compolab.task_vector import TaskVector
from compolab.tuning import TaskModule

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "TrainingDiverged",
    "cosine_factor",
    "decoupled_penalty_step",
    "finetune_task",
]

STYLES = ("full", "lora", "ia3")


class TrainingDiverged(CompolabError, FloatingPointError):
    """A loss became NaN or infinite; the run stops and nothing of this task is saved."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one task's fine-tuning.

    Attributes:
        style: Tuning style: ``full``, ``lora`` or ``ia3`` (spec §A.7).
        rank: LoRA rank r (3r on ``attn.qkv``).
        epochs: Passes over the task's training set.
        batch_size: Images per forward pass (micro-batch).
        accumulate: Micro-batches per optimiser step (the paper: 8 images x 16 = 128).
        lr: AdamW learning rate of the module and of the head (spec: 3e-4).
        weight_decay: AdamW weight decay (spec: 0).
        seed: Seed of the module's initialisation and of the batch order.
    """

    style: str = "lora"
    rank: int = 4
    epochs: int = 3
    batch_size: int = 64
    accumulate: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ConfigError(f"unknown tuning style {self.style!r}; choose one of {list(STYLES)}")
        for f in ("rank", "epochs", "batch_size", "accumulate"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"FinetuneConfig.{f} must be > 0, got {getattr(self, f)}")
        for f in ("lr", "weight_decay"):
            if getattr(self, f) < 0:
                raise ConfigError(f"FinetuneConfig.{f} must be >= 0, got {getattr(self, f)}")


@dataclass
class FinetuneResult:
    """What one task's fine-tuning produced."""

    module: TaskModule
    head: nn.Linear
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def cosine_factor(epoch: int, epochs: int) -> float:
    r"""The paper's per-epoch learning-rate factor :math:`\cos(99\pi e / (200 (K-1)))` (spec §A.8).

    It goes from 1 at the first epoch to :math:`\cos(0.495\pi) \approx 0.0157` at the last.

    Examples:
        >>> cosine_factor(0, 20), round(cosine_factor(19, 20), 4)
        (1.0, 0.0157)
    """
    if epochs <= 1:
        return 1.0
    return math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))


def decoupled_penalty_step(
    penalty: Tensor, params: Sequence[nn.Parameter], *, step: float, clip: float = 100.0
) -> Tensor:
    r"""The paper's decoupled penalty update (spec §A.3.2 item 7, §A.8): one plain SGD step.

    For every parameter tensor separately, the gradient of ``penalty`` is clipped to norm
    ``clip`` and applied as :math:`p \leftarrow p - s\,g` with :math:`s` the current cosine factor
    (**not** multiplied by the learning rate). The ``.grad`` fields (the task loss's gradients,
    used next by AdamW) are left untouched.

    Args:
        penalty: Scalar penalty, differentiable w.r.t. ``params``.
        params: The parameters to update.
        step: Step size :math:`s`.
        clip: Per-tensor gradient-norm clip (paper: 100).

    Returns:
        The penalty's value (detached), for logging.
    """
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is None:
                continue
            norm = g.norm()
            if norm > clip:
                g = g * (clip / (norm + 1e-6))
            p.sub_(step * g)
    return penalty.detach()


def finetune_task(
    backbone: nn.Module,
    theta0: dict[str, Tensor],
    task: Task,
    offset: int,
    cfg: FinetuneConfig = FinetuneConfig(),
    *,
    names: Sequence[str],
    frozen: Sequence[TaskVector] = (),
    frozen_coefs: Sequence[float] | None = None,
    coef: float = 1.0,
    module: TaskModule | None = None,
    head: nn.Linear | None = None,
    penalty: Callable[[TaskModule, nn.Linear], Tensor] | None = None,
    decoupled: bool = False,
    progress: bool | None = False,
    device: str | torch.device = "cpu",
) -> FinetuneResult:
    r"""Train τ_t and h_t on one task, at :math:`\theta_0 + \sum_s w_s\tau_s + w\,\tau_t`.

    Args:
        backbone: The frozen backbone θ0 (its parameters are not changed).
        theta0: θ0's named parameters (``compolab.tuning.theta0_of(backbone)``).
        task: The task; its labels are global, ``offset`` is its first label.
        offset: First global label of the task.
        cfg: Hyper-parameters.
        names: Target weights of the module.
        frozen: Earlier task vectors, frozen (IEL: all earlier ones; ITA: none).
        frozen_coefs: Their weights (default 1/S).
        coef: Weight of the current module in the forward (ITA: 1; IEL: 1/T).
        module: Start from this module (default: a fresh one, ΔW = 0).
        head: Start from this head (default: a fresh truncated-normal one).
        penalty: ``penalty(module, head)`` → scalar; added to the loss at every micro-batch
            (coupled), or applied by :func:`decoupled_penalty_step` at every optimiser step.
        decoupled: Apply the penalty as the paper's separate SGD step (spec §A.8).
        progress: Show a progress bar.
        device: Where to train.

    Returns:
        The trained module, head and per-epoch history (loss, penalty, train accuracy).

    Raises:
        TrainingDiverged: If a loss becomes NaN or infinite.
    """
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    if module is None:
        module = TaskModule.create(cfg.style, theta0, names, rank=cfg.rank, generator=gen)
    if head is None:
        head = new_head(_width(backbone), task.num_classes, generator=gen)
    model = ComposedForward(backbone, theta0, frozen, frozen_coefs, module=module, coef=coef)
    model.to(device)
    head.to(device)
    opt = torch.optim.AdamW(
        [{"params": module.parameters()}, {"params": head.parameters()}],
        lr=cfg.lr, weight_decay=cfg.weight_decay,
    )  # fmt: skip
    trainable = [p for p in [*module.parameters(), *head.parameters()] if p.requires_grad]
    history = []
    loader = make_loader(task.train, cfg.batch_size, shuffle=True, seed=cfg.seed)
    for epoch in tqdm(range(cfg.epochs), desc=f"task {task.index}", disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * cosine_factor(epoch, cfg.epochs)
        totals = {"loss": 0.0, "penalty": 0.0, "correct": 0, "seen": 0}
        model.train()
        opt.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device) - offset
            logits = head(model(x))  # only the current head: past-class logits are masked out
            loss = nn.functional.cross_entropy(logits, y)
            coupled = penalty is not None and not decoupled
            reg = penalty(module, head) if coupled else torch.zeros((), device=device)
            total = loss + reg
            if not torch.isfinite(total):
                raise TrainingDiverged(
                    f"task {task.index}, epoch {epoch}: loss is {loss.item()} and penalty "
                    f"{reg.item()}; the run stops here (earlier modules stay saved)"
                )
            (total / cfg.accumulate).backward()
            if (i + 1) % cfg.accumulate == 0 or i + 1 == len(loader):
                if penalty is not None and decoupled:
                    reg = decoupled_penalty_step(penalty(module, head), trainable,
                                                 step=cosine_factor(epoch, cfg.epochs))  # fmt: skip
                    if not torch.isfinite(reg):
                        raise TrainingDiverged(f"task {task.index}, epoch {epoch}: penalty is {reg.item()}")
                opt.step()  # a short last group of micro-batches still makes one step
                opt.zero_grad(set_to_none=True)
            totals["loss"] += loss.item() * len(y)
            totals["penalty"] += reg.item() * len(y)
            totals["correct"] += (logits.argmax(1) == y).sum().item()
            totals["seen"] += len(y)
        n = max(totals["seen"], 1)
        history.append({
            "epoch": epoch,
            "loss": totals["loss"] / n,
            "penalty": totals["penalty"] / n,
            "train_accuracy": 100.0 * totals["correct"] / n,
        })  # fmt: skip
    module.eval()
    return FinetuneResult(module, head, history, time.time() - t0)


def _width(backbone: nn.Module) -> int:
    """Feature width of a timm backbone."""
    width = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
    if not width:
        raise ConfigError("cannot tell the backbone's feature width (no num_features attribute)")
    return int(width)
