"""What several benchmarks time: random modules on a random-init backbone, and a no-grad forward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from compolab.tuning import TaskModule

__all__ = ["random_modules", "forward"]


def random_modules(
    style: str, theta0: Mapping[str, Tensor], names: Sequence[str], n: int, gen: torch.Generator
) -> list[TaskModule]:
    """``n`` modules of a tuning style (rank 4) with small random, non-zero deltas: timing only."""
    modules = []
    for _ in range(n):
        module = TaskModule.create(style, theta0, names, rank=4, generator=gen)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        modules.append(module)
    return modules


@torch.no_grad()
def forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` without autograd (an inference forward)."""
    return model(x)
