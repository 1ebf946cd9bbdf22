"""Pre-training of the tiny preset's ViT on the tiny world's pre-training classes (θ0 of ``tiny``).

``compolab pretrain`` runs :func:`pretrain` with :class:`PretrainConfig`'s defaults and writes the
checkpoint that ships inside the package (``compolab/assets/tiny_vit.safetensors`` plus its JSON
card). The run is seeded: a rebuild on the same machine gives the same weights up to float
round-off, and its downstream linear probe lands within a point or two of the shipped one.

Objective: cross-entropy on the (shape, pattern) class plus two auxiliary heads, one for the shape
and one for the pattern alone, which push the features to factorise; the auxiliary heads are
discarded (only the backbone is saved).
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compolab.data import ArrayDataset
from compolab.errors import ConfigError, TrainingDiverged
from compolab.linear_probe import probe_accuracy
from compolab.models import TINY_VIT, BackboneSpec, make_backbone, save_backbone
from compolab.world import PATTERNS, SHAPES, cached_generate, world_split

__all__ = ["PretrainConfig", "pretrain", "probe_datasets"]


@dataclass(frozen=True)
class PretrainConfig:
    """Pre-training recipe of the tiny ViT.

    Attributes:
        backbone: Shape of the ViT.
        steps: Optimiser steps (batch ``batch_size`` each).
        batch_size: Images per step.
        lr: Peak AdamW learning rate (one-cycle schedule, 10% warm-up).
        weight_decay: AdamW weight decay.
        pool_size: Pre-training images generated once (and cached).
        val_size: Held-out pre-training images for the reported accuracy.
        aux_weight: Weight of each auxiliary (shape, pattern) loss.
        seed: Seed of data, initialisation and batch order.
    """

    backbone: BackboneSpec = field(default_factory=lambda: TINY_VIT)
    steps: int = 2400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    pool_size: int = 80_000
    val_size: int = 4_000
    aux_weight: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "pool_size", "val_size"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"PretrainConfig.{f} must be > 0, got {getattr(self, f)}")
        for f in ("lr", "weight_decay", "aux_weight"):
            if getattr(self, f) < 0:
                raise ConfigError(f"PretrainConfig.{f} must be >= 0, got {getattr(self, f)}")


def probe_datasets(
    seed: int = 0, img_size: int = 32, train_per_class: int = 100, test_per_class: int = 50
) -> tuple[ArrayDataset, ArrayDataset, int]:
    """The downstream linear-probe data: all 100 downstream classes, fresh images.

    Returns:
        ``(train, test, num_classes)``.
    """
    classes = world_split(seed=seed).downstream
    out = []
    for k, per_class in enumerate((train_per_class, test_per_class)):
        labels = np.repeat(np.arange(len(classes)), per_class)
        images, labels = cached_generate(
            classes, len(labels), seed=seed * 1000 + 500 + k, size=img_size, labels=labels
        )
        out.append(ArrayDataset(images, labels))
    return out[0], out[1], len(classes)


def pretrain(
    cfg: PretrainConfig = PretrainConfig(),
    *,
    out: str | Path | None = None,
    probe: bool = True,
    progress: bool | None = True,
) -> tuple[nn.Module, dict]:
    """Pre-train the tiny ViT on the pre-training classes of the tiny world.

    Args:
        cfg: The recipe.
        out: Where to write ``<out>.safetensors`` and ``<out>.json``; nothing is written if None.
        probe: Also measure the downstream linear-probe accuracy and store it in the card.
        progress: Show a progress bar.

    Returns:
        ``(backbone, card)``; ``card["history"]`` holds the training curve (every 50 steps).
    """
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    spec = cfg.backbone
    split = world_split(seed=cfg.seed)
    classes = split.pretrain
    images, labels = cached_generate(classes, cfg.pool_size, seed=cfg.seed * 1000 + 1,
                                     size=spec.img_size)  # fmt: skip
    val_images, val_labels = cached_generate(classes, cfg.val_size, seed=cfg.seed * 1000 + 2,
                                             size=spec.img_size)  # fmt: skip
    pool, val = ArrayDataset(images, labels), ArrayDataset(val_images, val_labels)
    shape_of = torch.tensor([c[0] for c in classes])
    pattern_of = torch.tensor([c[1] for c in classes])

    backbone = make_backbone(spec).train()
    heads = nn.ModuleDict({
        "cls": nn.Linear(spec.embed_dim, len(classes)),
        "shape": nn.Linear(spec.embed_dim, len(SHAPES)),
        "pattern": nn.Linear(spec.embed_dim, len(PATTERNS)),
    })  # fmt: skip
    params = list(backbone.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    order = torch.randperm(len(pool), generator=gen)
    cursor = 0
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(pool), generator=gen), 0
        idx = order[cursor : cursor + cfg.batch_size].tolist()
        cursor += cfg.batch_size
        x, y = (torch.stack(t) for t in zip(*pool.__getitems__(idx), strict=True))
        f = backbone(x)
        loss = nn.functional.cross_entropy(heads["cls"](f), y)
        aux = nn.functional.cross_entropy(heads["shape"](f), shape_of[y])
        aux = aux + nn.functional.cross_entropy(heads["pattern"](f), pattern_of[y])
        total = loss + cfg.aux_weight * aux
        if not torch.isfinite(total):
            raise TrainingDiverged(f"pre-training loss is {total.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    backbone.eval()
    with torch.no_grad():
        correct = sum(
            (heads["cls"](backbone(x)).argmax(1) == y).sum().item()
            for x, y in torch.utils.data.DataLoader(val, batch_size=512)
        )
    card: dict = {
        "backbone": asdict(spec),
        "pretrain": {k: v for k, v in asdict(cfg).items() if k != "backbone"},
        "data_seed": cfg.seed,
        "pretrain_classes": len(classes),
        "pretrain_val_accuracy": round(100.0 * correct / len(val), 2),
        "history": history,
        "train_seconds": round(time.time() - t_start, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    if probe:
        train, test, n_cls = probe_datasets(cfg.seed, spec.img_size)
        card["probe_accuracy"] = round(probe_accuracy(backbone, train, test, n_cls), 2)
    if out is not None:
        card = save_backbone(backbone, Path(out).with_suffix(".safetensors"), card)
    return backbone, card
