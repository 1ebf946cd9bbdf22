"""The training loop every method shares, and the fine-tuning of one task's module τ_t and head h_t.

:func:`train_loop` runs the epochs: per-epoch learning-rate factor, micro-batches accumulated into
one optimiser step, an optional penalty (a loss term, or the paper's decoupled SGD step), a
:class:`~compolab.errors.TrainingDiverged` on the first non-finite loss, and a per-epoch history.
:func:`finetune_task` uses it for ITA, IEL, EWC and the baselines: a forward at
θ0 + Σ_s w_s τ_s (frozen, pre-merged) + w·τ_t (trainable), the current head on top, cross-entropy
over the current task's classes only (the logits of past classes masked out, as the official
code), AdamW with the paper's per-epoch cosine factor. TMC (:func:`compolab.tmc.train_component`)
uses it with its own model, loss and schedule. The methods (``compolab.methods``) choose what is
frozen, the weights and the penalty.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compolab.compose import ComposedForward
from compolab.data import Task
from compolab.distributed import current_world, shard_weight, train_loader, wrap_data_parallel
from compolab.errors import ConfigError, TrainingDiverged
from compolab.heads import new_head
from compolab.runtime import Runtime
from compolab.task_vector import TaskVector
from compolab.tuning import STYLES, TaskModule

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "cosine_factor",
    "decoupled_penalty_step",
    "physical_batch",
    "train_loop",
    "finetune_task",
    "feature_width",
]

@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one task's fine-tuning.

    Attributes:
        style: Tuning style: ``full``, ``lora`` or ``ia3`` (:data:`compolab.tuning.STYLES`).
        rank: LoRA rank r (3r on ``attn.qkv``).
        epochs: Passes over the task's training set.
        batch_size: Images per forward pass (micro-batch).
        accumulate: Micro-batches per optimiser step (the paper: 8 images x 16 = 128).
        lr: AdamW learning rate of the module and of the head (the paper: 3e-4).
        weight_decay: AdamW weight decay (the paper: 0).
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
            raise ConfigError(f"`style` {self.style!r} is not a tuning style; choose one of {sorted(STYLES)}")
        for f in ("rank", "epochs", "batch_size", "accumulate"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"FinetuneConfig `{f}` must be > 0, got {getattr(self, f)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"FinetuneConfig `lr` must be > 0 and finite, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"FinetuneConfig `weight_decay` must be >= 0 and finite, "
                              f"got {self.weight_decay}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"FinetuneConfig.seed must be in [0, 2**32), got {self.seed}")


@dataclass
class FinetuneResult:
    """What one task's fine-tuning produced."""

    module: TaskModule
    head: nn.Linear
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def cosine_factor(epoch: int, epochs: int) -> float:
    r"""The paper's per-epoch learning-rate factor :math:`\cos(99\pi e / (200 (K-1)))` (official code).

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
    r"""The paper's decoupled penalty update (LoRA and (IA)³ only, as the paper): one plain SGD step.

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
    if not penalty.requires_grad:  # no term left (the "no-reg" ablation): nothing to apply
        return penalty.detach()
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


class _Network(nn.Module):
    """``head(model(x))`` (or ``model(x)``) as one module, so that DDP / compile see one forward."""

    def __init__(self, model: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out if self.head is None else self.head(out)


def physical_batch(cfg: FinetuneConfig, runtime: Runtime | None) -> int:
    """Images per forward pass: ``runtime.physical_batch``; by default the whole optimiser step on
    CUDA and the config's micro-batch on the CPU.

    A physical batch larger than the micro-batch must be a multiple of it that divides the step
    (``batch_size × accumulate``), so that every optimiser step sees the same images with the same
    weights (:func:`train_loop`).

    Raises:
        ConfigError: For a physical batch that does not fit the step.
    """
    step = cfg.batch_size * cfg.accumulate
    size = cfg.batch_size
    if runtime is not None:  # on CUDA the default is the whole step in one forward (paper: 8 x 16 = 128)
        size = runtime.physical_batch or (step if runtime.device.type == "cuda" else cfg.batch_size)
    if size != cfg.batch_size and (size % cfg.batch_size or step % size):
        raise ConfigError(f"physical batch {size} must be a multiple of the micro-batch {cfg.batch_size} "
                          f"that divides the step of {step} images (batch_size x accumulate)")  # fmt: skip
    return size


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    cfg: FinetuneConfig,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    head: nn.Module | None = None,
    lr_factor: Callable[[int, int], float] = cosine_factor,
    penalty: Callable[[], Tensor] | None = None,
    decoupled: Sequence[nn.Parameter] | None = None,
    offset: int = 0,
    desc: str = "train",
    progress: bool | None = False,
    runtime: Runtime | str | torch.device | None = None,
) -> list[dict]:
    r"""``cfg.epochs`` passes over ``loader``: the one training loop of fine-tuning and TMC.

    Per epoch, every parameter group's learning rate is ``cfg.lr * lr_factor(epoch, cfg.epochs)``;
    per micro-batch, the loss ``loss_fn(head(model(x)), y - offset)`` (plus the penalty when it is
    coupled) is back-propagated divided by ``cfg.accumulate``, and every ``cfg.accumulate``
    micro-batches (and after the last one) the optimiser steps.

    **Physical batches.** When ``loader`` yields batches of ``k × cfg.batch_size`` images
    (:func:`physical_batch`), each counts as ``n / cfg.batch_size`` micro-batches: its mean loss is
    weighted ``n / (cfg.batch_size · cfg.accumulate)`` and the optimiser still steps every
    ``batch_size × accumulate`` images, so the gradient of a step is the same mean over the same
    images. The one difference: a last micro-batch of an epoch shorter than ``batch_size`` weighs
    each of its images like any other (``1/(b·A)``) instead of as a whole micro-batch.

    **Several ranks** (``torchrun``): the model and head run under DDP, gradients are synchronised
    only at optimiser steps, each shard's loss is weighted by :func:`~compolab.distributed.shard_weight`
    (the ranks' averaged gradient is the whole batch's), and the history sums every rank.

    **Precision**: the forward and the loss run under ``runtime``'s autocast; the penalty, the
    parameters and AdamW's state stay float32.

    Args:
        model: Maps images to outputs (put in training mode each epoch).
        optimizer: Holds the trainable tensors.
        loader: ``(x, y)`` micro-batches (or physical batches) with global labels.
        cfg: Epochs, accumulation and base learning rate.
        loss_fn: ``loss_fn(outputs, labels)`` → scalar mean.
        head: Applied to ``model``'s outputs when given.
        lr_factor: ``lr_factor(epoch, epochs)``: the schedule (:func:`cosine_factor`).
        penalty: ``penalty()`` → scalar: added to every micro-batch's loss (coupled), or, with
            ``decoupled``, applied by :func:`decoupled_penalty_step` before every optimiser step.
        decoupled: The tensors of the decoupled penalty step (its step size is ``lr_factor``).
        offset: Subtracted from the labels (the first label of the task).
        desc: Names the task in the progress bar and in errors.
        progress: Show a progress bar.
        runtime: Device, autocast and compile (:class:`~compolab.runtime.Runtime`), or a device
            (float32 there); default the CPU.

    Returns:
        One dict per epoch: ``epoch``, mean ``loss``, mean ``penalty``, ``train_accuracy`` (%).

    Raises:
        TrainingDiverged: If a loss or penalty becomes NaN or infinite (checked at every optimiser
            step, one device synchronisation per step).
    """
    runtime = Runtime.of(runtime)
    device, world = runtime.device, current_world()
    network = wrap_data_parallel(_Network(model, head), device)
    forward = torch.compile(network) if runtime.compile else network
    merged = physical_batch(cfg, runtime) != cfg.batch_size
    coupled = penalty is not None and decoupled is None
    history = []
    for epoch in tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(epoch, cfg.epochs)
        # sums on the device (float64, as Python floats): no host round trip per batch
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, penalty, correct, seen
        network.train()
        optimizer.zero_grad(set_to_none=True)
        num_batches, units_done, finite = len(loader), 0.0, torch.ones((), dtype=torch.bool, device=device)
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True) - offset
            weight, global_n = shard_weight(loader, i, len(y))
            units = global_n / cfg.batch_size if merged else 1.0
            steps = units_done + units >= cfg.accumulate - 1e-9 or i + 1 == num_batches
            sync = contextlib.nullcontext() if steps or not world.active else network.no_sync()
            with sync:
                with runtime.autocast_context():
                    outputs = forward(x)
                    loss = loss_fn(outputs, y)
                reg = penalty() if coupled else torch.zeros((), device=device)
                total = (loss if weight == 1.0 else loss * weight) + reg
                finite &= torch.isfinite(total)
                (total / (cfg.accumulate if units == 1.0 else cfg.accumulate / units)).backward()
            units_done += units
            if steps:
                if not bool(finite):
                    raise TrainingDiverged(
                        f"{desc}, epoch {epoch}: loss is {loss.item()} and penalty {reg.item()}; "
                        "the run stops here (earlier modules stay saved)"
                    )
                if penalty is not None and decoupled is not None:
                    reg = decoupled_penalty_step(penalty(), decoupled, step=lr_factor(epoch, cfg.epochs))
                    if not torch.isfinite(reg):
                        raise TrainingDiverged(f"{desc}, epoch {epoch}: penalty is {reg.item()}")
                optimizer.step()  # a short last group of micro-batches still makes one step
                optimizer.zero_grad(set_to_none=True)
                units_done = 0.0
            if weight != 0.0:  # a padded shard (weight 0) holds no image of the batch
                n = len(y)
                totals += torch.stack([loss.detach().double() * n, reg.detach().double() * n,
                                       (outputs.argmax(1) == y).sum().double(),
                                       torch.tensor(n, dtype=torch.float64, device=device)])  # fmt: skip
        if world.active:
            torch.distributed.all_reduce(totals)
        loss_sum, penalty_sum, correct, seen = totals.tolist()
        n = max(seen, 1)
        history.append({
            "epoch": epoch,
            "loss": loss_sum / n,
            "penalty": penalty_sum / n,
            "train_accuracy": 100.0 * int(correct) / n,
        })  # fmt: skip
    return history


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
    runtime: Runtime | str | torch.device | None = None,
) -> FinetuneResult:
    r"""Train τ_t and h_t on one task, at :math:`\theta_0 + \sum_s w_s\tau_s + w\,\tau_t`.

    Args:
        backbone: The frozen backbone θ0 (its parameters are not changed).
        theta0: θ0's named parameters (``compolab.models.theta0_of(backbone)``).
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
        decoupled: Apply the penalty as the paper's separate SGD step.
        progress: Show a progress bar.
        runtime: Device, autocast, physical batch, loader workers (:class:`~compolab.runtime.Runtime`),
            or a device (float32 there); default the CPU.

    Returns:
        The trained module, head and per-epoch history (loss, penalty, train accuracy).

    Raises:
        TrainingDiverged: If a loss becomes NaN or infinite.
    """
    t0 = time.time()
    runtime = Runtime.of(runtime)
    gen = torch.Generator().manual_seed(cfg.seed)
    if module is None:
        module = TaskModule.create(cfg.style, theta0, names, rank=cfg.rank, generator=gen)
    if head is None:
        head = new_head(feature_width(backbone), task.num_classes, generator=gen)
    model = ComposedForward(backbone, theta0, frozen, frozen_coefs, module=module, coef=coef)
    model.to(runtime.device)
    head.to(runtime.device)
    opt = torch.optim.AdamW(
        [{"params": module.parameters()}, {"params": head.parameters()}],
        lr=cfg.lr, weight_decay=cfg.weight_decay,
    )  # fmt: skip
    trainable = [p for p in [*module.parameters(), *head.parameters()] if p.requires_grad]
    loader = train_loader(task.train, physical_batch(cfg, runtime), seed=cfg.seed, runtime=runtime)
    history = train_loop(
        model, opt, loader, cfg,
        loss_fn=nn.functional.cross_entropy,  # only the current head: past-class logits are masked out
        head=head,
        penalty=None if penalty is None else lambda: penalty(module, head),
        decoupled=trainable if decoupled else None,
        offset=offset, desc=f"task {task.index}", progress=progress, runtime=runtime,
    )  # fmt: skip
    module.eval()
    return FinetuneResult(module, head, history, time.time() - t0)


def feature_width(backbone: nn.Module) -> int:
    """Feature width of a timm backbone."""
    width = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
    if not width:
        raise ConfigError("cannot tell the backbone's feature width (no num_features attribute)")
    return int(width)
