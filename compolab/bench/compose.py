"""``compolab bench compose``: the cost of a composed model as the number of modules T grows.

A composed model of T modules is one merged model, θ0 + Σ w_t τ_t: its inference costs the same at
T = 1 and T = 10, unlike an output ensemble (T forwards). IEL's training step is the same (its frozen
modules are pre-merged).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compolab.bench.parts import forward, random_modules
from compolab.bench.timing import best_of_rounds
from compolab.models import TINY_VIT, make_backbone, theta0_of, tuned_weight_names
from compolab.tuning import TaskModule

__all__ = ["bench_compose"]


def bench_compose(
    *, num_modules: int = 10, batch_size: int = 256, repeats: int = 10, style: str = "lora", seed: int = 0
) -> dict:
    """Inference and training cost of composition as the number of modules grows.

    On the same inputs and in one process: a composed model of T = 1 and T = ``num_modules``
    modules (merged into one model), an output ensemble of ``num_modules`` models, and one IEL
    training step with 1 and ``num_modules`` frozen modules (pre-merged). Timings are the best of
    ``repeats`` runs; ratios near 1 mean "cost independent of T".

    Returns:
        ``{"composed_t10_over_t1", "ensemble_t10_over_t1", "train_step_t10_over_t1", "seconds",
        "device", "batch_size", "num_modules", "style"}``.
    """
    from compolab.compose import ComposedForward, merge

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = make_backbone(TINY_VIT).requires_grad_(False)
    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    taus = [m.delta(theta0).detach() for m in random_modules(style, theta0, names, num_modules, gen)]
    x = torch.randn(batch_size, 3, TINY_VIT.img_size, TINY_VIT.img_size, generator=gen)
    composed_1 = merge(backbone, theta0, taus[:1])
    composed_t = merge(backbone, theta0, taus)
    members = [merge(backbone, theta0, [tau], [1.0]) for tau in taus]

    def ensemble() -> torch.Tensor:
        return torch.stack([forward(m, x) for m in members]).mean(0)

    def train_step(frozen: list) -> Callable[[], None]:
        module = TaskModule.create(style, theta0, names, rank=4, generator=gen)
        model = ComposedForward(backbone, theta0, frozen, module=module, coef=1 / (len(frozen) + 1))

        def step() -> None:
            model(x[:64]).square().mean().backward()
            module.zero_grad(set_to_none=True)

        return step

    seconds = best_of_rounds({
        "composed_t1": lambda: forward(composed_1, x),
        "composed_t": lambda: forward(composed_t, x),
        "ensemble_t": ensemble,
        "train_step_t1": train_step(taus[:1]),
        "train_step_t": train_step(taus),
    }, repeats)  # fmt: skip
    return {
        "composed_t10_over_t1": round(seconds["composed_t"] / seconds["composed_t1"], 3),
        "ensemble_t10_over_t1": round(seconds["ensemble_t"] / seconds["composed_t1"], 3),
        "train_step_t10_over_t1": round(seconds["train_step_t"] / seconds["train_step_t1"], 3),
        "seconds": {k: round(v, 5) for k, v in seconds.items()},
        "device": "cpu",
        "batch_size": batch_size,
        "num_modules": num_modules,
        "style": style,
    }
