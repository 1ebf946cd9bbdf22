"""``compolab bench tmc``: the cost of TMC's linearised model against the plain (non-linear) one.

One linearised forward (primal + tangent pass) against one plain forward; a composition of T
linearised components (still one forward) against an output ensemble of T models (T forwards).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compolab.bench.parts import forward, random_modules
from compolab.bench.timing import best_of_rounds
from compolab.bench.timing import threads as cpu_threads
from compolab.heads import new_head
from compolab.models import TINY_VIT, make_backbone, theta0_of, tuned_weight_names
from compolab.tuning import TaskModule

__all__ = ["bench_tmc"]


def bench_tmc(
    *,
    num_components: int = 10,
    batch_size: int = 64,
    num_classes: int = 50,
    repeats: int = 3,
    style: str = "full",
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Inference and training cost of TMC's linearised model against the plain (non-linear) one.

    On the tiny preset's ViT shape (random init), with a ``num_classes`` head and one batch, in one
    process and interleaved (best of ``repeats`` after a warm-up, best over 3 rounds):

    * ``plain``: one forward of a merged model θ0 + τ and its head (fused attention);
    * ``linearized``: one linearised forward, f(θ0) + Jτ with the head linearised too (primal +
      tangent pass, MATH attention);
    * ``tangent``: the composition of ``num_components`` components (one linearised forward);
    * ``ensemble``: the output ensemble of ``num_components`` merged non-linear models (T forwards);
    * ``tme``: the output ensemble of the ``num_components`` linearised models (T linearised
      forwards; the same outputs as ``tangent``, whose gap to it is reported as
      ``tangent_vs_tme_max_abs``);
    * one training step (forward + backward) of a linearised component against one of the
      ordinary fine-tuning forward (:class:`~compolab.compose.ComposedForward`).

    Args:
        num_components: T, the number of composed components / ensemble members.
        batch_size: Images per forward.
        num_classes: Outputs of the (base) head.
        repeats: Timed calls per measurement.
        style: Tuning style of the random components.
        seed: Seed of the model, the components and the batch.
        threads: CPU threads for the run (restored afterwards); default: leave torch's setting.

    Returns:
        ``{"linearized_over_plain", "tangent10_over_plain", "ensemble10_over_plain", "tme10_over_plain",
        "ensemble10_over_tangent10", "linearized_step_over_plain_step", "tangent_vs_tme_max_abs", "seconds",
        "device", "batch_size", "num_components", "style", "threads"}`` (the ``10`` in the keys is
        ``num_components``).
    """
    from compolab.compose import ComposedForward, merge
    from compolab.linearize import LinearizedModel, TangentComponent, compose_linearized
    from compolab.task_vector import TaskVector
    from compolab.tmc import OutputEnsemble, base_head, scaled_square_loss

    with cpu_threads(threads):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        backbone = make_backbone(TINY_VIT).requires_grad_(False)
        theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
        head = base_head(TINY_VIT.embed_dim, num_classes, seed=seed)
        shapes = {n: p.shape for n, p in head.named_parameters()}
        components = [
            TangentComponent(
                module.delta(theta0).detach(),
                TaskVector({n: 0.01 * torch.randn(shape, generator=gen) for n, shape in shapes.items()}),
            )
            for module in random_modules(style, theta0, names, num_components, gen)
        ]
        taus = [c.tau for c in components]
        x = torch.randn(batch_size, 3, TINY_VIT.img_size, TINY_VIT.img_size, generator=gen)
        y = torch.randint(num_classes, (batch_size,), generator=gen)
        plain = merge(backbone, theta0, taus[:1], [1.0])
        linearized = compose_linearized(backbone, components[:1], head=head)
        tangent = compose_linearized(backbone, components, head=head)
        ensemble = OutputEnsemble(backbone, theta0, taus, heads=head)
        tme = [compose_linearized(backbone, [c], head=head) for c in components]

        def tme_forward() -> torch.Tensor:
            return torch.stack([forward(m, x) for m in tme]).mean(0)

        def plain_step() -> Callable[[], None]:
            module = TaskModule.create(style, theta0, names, rank=4, generator=gen)
            model = ComposedForward(backbone, theta0, module=module)
            step_head = new_head(TINY_VIT.embed_dim, num_classes)

            def step() -> None:
                nn.functional.cross_entropy(step_head(model(x)), y).backward()
                module.zero_grad(set_to_none=True)
                step_head.zero_grad(set_to_none=True)

            return step

        def linearized_step() -> Callable[[], None]:
            module = TaskModule.create(style, theta0, names, rank=4, generator=gen)
            model = LinearizedModel(backbone, theta0, module=module, head=head)

            def step() -> None:
                scaled_square_loss(model(x), y).backward()
                model.zero_grad(set_to_none=True)

            return step

        gap = float((forward(tangent, x) - tme_forward()).abs().max())
        seconds = best_of_rounds({
            "plain": lambda: head(forward(plain, x)),
            "linearized": lambda: forward(linearized, x),
            "tangent": lambda: forward(tangent, x),
            "ensemble": lambda: forward(ensemble, x),
            "tme": tme_forward,
            "plain_step": plain_step(),
            "linearized_step": linearized_step(),
        }, repeats)  # fmt: skip
        used_threads = torch.get_num_threads()
    t = num_components
    return {
        "linearized_over_plain": round(seconds["linearized"] / seconds["plain"], 3),
        f"tangent{t}_over_plain": round(seconds["tangent"] / seconds["plain"], 3),
        f"ensemble{t}_over_plain": round(seconds["ensemble"] / seconds["plain"], 3),
        f"tme{t}_over_plain": round(seconds["tme"] / seconds["plain"], 3),
        f"ensemble{t}_over_tangent{t}": round(seconds["ensemble"] / seconds["tangent"], 3),
        "linearized_step_over_plain_step": round(seconds["linearized_step"] / seconds["plain_step"], 3),
        "tangent_vs_tme_max_abs": gap,
        "seconds": {k: round(v, 5) for k, v in seconds.items()},
        "device": "cpu",
        "batch_size": batch_size,
        "num_components": num_components,
        "style": style,
        "threads": used_threads,
    }
