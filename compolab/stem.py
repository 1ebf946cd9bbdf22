r"""The frozen stem of the backbone, computed once per image set.

No module of the kit touches the patch embedding: every tuning style targets the blocks'
``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (:func:`compolab.models.tuned_weight_names`),
and θ0 stays in eval mode (its BatchNorm statistics are part of θ0). So the stem's output for an
image is the same at every step of a run, under every composition :math:`\theta_0 + \sum_t w_t\tau_t`.
On the tiny ViT its convolutional stem is about 40 % of a forward (``compolab bench step``).

:func:`cache_stem` maps every split of every task through ``backbone.patch_embed`` once, in large
batches, and returns the benchmark of the tokens. The tiny ViT's embedding (:class:`ConvStemEmbed`)
takes either images ``(B, 3, H, W)`` or such tokens ``(B, N, D)``, so every forward of the kit —
training, the Fisher, the pre-tuning features, evaluation, the edits — runs unchanged on them.

Examples:
    >>> import torch
    >>> from compolab.models import make_backbone
    >>> vit = make_backbone()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> bool(torch.allclose(vit(vit.patch_embed(x)), vit(x), atol=1e-6))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from compolab.data import Benchmark, Task

__all__ = ["TokenDataset", "stem_is_frozen", "cache_stem"]


class TokenDataset(Dataset):
    """Stem tokens ``(N, L, D)`` and labels held in memory; yields ``(tokens, label)``."""

    def __init__(self, tokens: Tensor, labels: Tensor) -> None:
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.tokens[i], self.labels[i]

    def __getitems__(self, idx: list[int]):
        idx_t = torch.as_tensor(idx)
        return list(zip(self.tokens[idx_t], self.labels[idx_t], strict=True))


def stem_is_frozen(backbone: nn.Module, names: Sequence[str]) -> bool:
    """Whether ``backbone`` takes stem tokens (:class:`~compolab.models.ConvStemEmbed`) and no
    tuned weight (``names``) lies in its stem."""
    embed = getattr(backbone, "patch_embed", None)
    tuned_stem = any(n.startswith("patch_embed.") for n in names)
    return bool(getattr(embed, "accepts_tokens", False)) and not tuned_stem


@torch.no_grad()
def _tokens(stem: nn.Module, data: Dataset, batch_size: int, device: torch.device) -> TokenDataset:
    parts, labels = [], []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        parts.append(stem(x.to(device)))
        labels.append(y)
    if not parts:
        return TokenDataset(torch.empty(0), torch.empty(0, dtype=torch.long))
    return TokenDataset(torch.cat(parts).cpu(), torch.cat(labels))


def cache_stem(
    bench: Benchmark,
    backbone: nn.Module,
    names: Sequence[str],
    *,
    batch_size: int = 500,
) -> Benchmark:
    """``bench`` with every image replaced by θ0's stem tokens, when the stem is frozen; else ``bench``.

    Args:
        bench: The benchmark (not changed).
        backbone: θ0, in eval mode.
        names: The weights the run's modules tune.
        batch_size: Images per stem forward.

    Returns:
        A new benchmark with the same tasks, labels and class names, whose datasets yield tokens.
    """
    if not stem_is_frozen(backbone, names):
        return bench
    device = next(backbone.parameters()).device
    stem = backbone.patch_embed
    was_training = stem.training
    stem.eval()
    tasks = [Task(t.index, t.classes, *(_tokens(stem, split, batch_size, device)
                                        for split in (t.train, t.val, t.test)))
             for t in bench.tasks]  # fmt: skip
    stem.train(was_training)
    return Benchmark(bench.name, tasks, bench.class_names, bench.info)
