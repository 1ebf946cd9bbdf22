"""Per-task classification heads, concatenated into one class-incremental classifier.

The paper's network head is a list of linear heads, one per task (768 → classes of task s), whose
logits are concatenated; older heads are frozen when a new one is added. The head
follows the composition: composing a subset of tasks keeps only their heads, so the classes of a
dropped task disappear from the output.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from compolab.errors import ConfigError

__all__ = ["new_head", "IncrementalHead", "ClassGaussians", "pretune_heads"]


def new_head(in_features: int, num_classes: int, *, generator: torch.Generator | None = None) -> nn.Linear:
    """A new task head: truncated-normal weights (std 0.02), zero bias, as in the paper's code."""
    head = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        w = torch.randn(head.weight.shape, generator=generator) * 0.02
        head.weight.copy_(w.clamp_(-0.04, 0.04))
        head.bias.zero_()
    return head


class IncrementalHead(nn.Module):
    """Heads of several tasks whose logits are concatenated in task order.

    Args:
        heads: The per-task heads, in task order.
        tasks: The task ids of the heads (default ``0 .. len(heads) - 1``).
        classes: The global labels of each head's outputs (default: consecutive from 0).
    """

    def __init__(
        self,
        heads: Sequence[nn.Linear],
        tasks: Sequence[int] | None = None,
        classes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.tasks = tuple(range(len(heads))) if tasks is None else tuple(tasks)
        if classes is None:
            sizes = [h.out_features for h in heads]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            classes = [range(s, s + n) for s, n in zip(starts, sizes, strict=True)]
        self.classes = tuple(tuple(c) for c in classes)
        if len(self.tasks) != len(self.heads) or len(self.classes) != len(self.heads):
            raise ConfigError("IncrementalHead needs one task id and one class list per head")
        for h, c in zip(self.heads, self.classes, strict=True):
            if h.out_features != len(c):
                raise ConfigError(f"a head has {h.out_features} outputs but {len(c)} classes")

    @property
    def global_labels(self) -> torch.Tensor:
        """Global label of each output column."""
        return torch.tensor([c for cs in self.classes for c in cs])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Concatenated logits ``(B, Σ classes)``."""
        return torch.cat([h(features) for h in self.heads], dim=-1)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted *global* labels (class-incremental: argmax over every included class)."""
        return self.global_labels.to(features.device)[self(features).argmax(-1)]


# --------------------------------------------------------------------------- pre-tuning


@dataclass
class ClassGaussians:
    """Per-class diagonal Gaussian statistics of θ0's features (the official code's, simplified).

    The paper fits a mixture of 5 diagonal Gaussians per class; the kit keeps one diagonal
    Gaussian per class, which is what classifier alignment samples from.

    Attributes:
        means: ``{global label: (D,) mean}``.
        variances: ``{global label: (D,) variance}`` (floored at ``eps``).
    """

    means: dict[int, torch.Tensor] = field(default_factory=dict)
    variances: dict[int, torch.Tensor] = field(default_factory=dict)

    def update(self, features: torch.Tensor, labels: torch.Tensor, *, eps: float = 1e-6) -> None:
        """Add (or refresh) the statistics of every class present in ``labels``."""
        for c in labels.unique().tolist():
            f = features[labels == c].double()
            self.means[c] = f.mean(0).float()
            self.variances[c] = (f.var(0, unbiased=False) + eps).float()

    def sample(self, classes: Sequence[int], per_class: int, generator: torch.Generator) -> tuple:
        """``per_class`` synthetic features of each class: ``(features, labels)``."""
        feats, labels = [], []
        for c in classes:
            noise = torch.randn(per_class, self.means[c].shape[0], generator=generator)
            feats.append(self.means[c] + noise * self.variances[c].sqrt())
            labels.append(torch.full((per_class,), c, dtype=torch.long))
        return torch.cat(feats), torch.cat(labels)


def _masked_probe(
    head: IncrementalHead,
    features,
    labels,
    current: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Linear probing of head ``current`` on θ0 features, past-class logits masked (SGD)."""
    h = head.heads[current]
    offset = head.classes[current][0]
    opt = torch.optim.SGD(h.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
            loss = nn.functional.cross_entropy(h(features[idx]), labels[idx] - offset)
            opt.zero_grad()
            loss.backward()
            opt.step()


def _align(
    head: IncrementalHead,
    stats: ClassGaussians,
    *,
    epochs: int,
    per_class: int,
    lr: float,
    batch_size: int,
    temperature: float,
    generator: torch.Generator,
) -> None:
    """Classifier alignment: CE on normalised logits z / (τ (‖z‖ + 1e-7)) of synthetic features."""
    classes = [c for cs in head.classes for c in cs]
    column = {c: i for i, c in enumerate(classes)}
    opt = torch.optim.SGD(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    for _ in range(epochs):
        feats, labels = stats.sample(classes, per_class, generator)
        target = torch.tensor([column[c] for c in labels.tolist()])
        for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
            z = head(feats[idx])
            z = z / (temperature * (z.norm(dim=-1, keepdim=True) + 1e-7))
            loss = nn.functional.cross_entropy(z, target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()


def pretune_heads(
    pretuned: IncrementalHead,
    stats: ClassGaussians,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    probe_epochs: int = 3,
    probe_lr: float = 0.01,
    align_epochs: int = 10,
    align_samples: int = 256,
    align_lr: float = 0.01,
    temperature: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
) -> IncrementalHead:
    """Task pre-consolidation: returns the new pre-tuned classifier :math:`C_{pre}`.

    On a copy of ``pretuned`` (whose last head is the current task's): linear probing of the
    current head on θ0 features with the past-class logits masked (SGD, ``probe_lr``), then
    classifier alignment of **all** heads on features sampled from ``stats`` for every seen class
    (SGD with cosine annealing, normalised logits with temperature 0.1).

    Args:
        pretuned: The previous :math:`C_{pre}` heads plus a fresh head for the current task.
        stats: Class statistics of every seen class (current included).
        features, labels: θ0 features and global labels of the current task's training set.
        probe_epochs, probe_lr: Linear probing (paper: 3 epochs, lr 0.01).
        align_epochs: Alignment epochs (paper: 10 + 5 t).
        align_samples: Synthetic features per class and epoch (paper: 256).
        align_lr, temperature, batch_size: Alignment SGD lr, logit temperature, batch size.
        seed: Seed of the shuffles and of the sampling.

    Returns:
        The new :math:`C_{pre}` (a copy; ``pretuned`` is unchanged).
    """
    gen = torch.Generator().manual_seed(seed)
    head = copy.deepcopy(pretuned).requires_grad_(True)
    with torch.enable_grad():
        _masked_probe(head, features, labels, len(head.heads) - 1, epochs=probe_epochs, lr=probe_lr,
                      batch_size=batch_size, generator=gen)  # fmt: skip
        _align(head, stats, epochs=align_epochs, per_class=align_samples, lr=align_lr,
               batch_size=batch_size, temperature=temperature, generator=gen)  # fmt: skip
    return head.requires_grad_(False)
