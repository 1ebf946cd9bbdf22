"""``compolab bench probe``: the cost of one basin-probe curve (:func:`compolab.probes.interpolate`).

One point per forward (the probe's CPU default), vmapped points, and a plain loop of merged models,
on the same λ values and images; the three curves must agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compolab.bench.parts import random_modules
from compolab.bench.timing import threads as cpu_threads
from compolab.bench.timing import timed
from compolab.heads import new_head
from compolab.models import TINY_VIT, make_backbone, theta0_of, tuned_weight_names

__all__ = ["bench_probe"]


def bench_probe(
    *,
    points: int = 41,
    images: int = 500,
    num_classes: int = 50,
    chunk: int = 8,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Cost of one basin-probe curve: ``points`` values of λ on ``images`` probe images (default: 41
    points, 500 images).

    On the tiny preset's ViT shape (random init) with a ``num_classes`` head, in one process: the
    probe with one point per forward (its CPU default, fused attention), the vmapped probe
    (``chunk`` points per forward, math attention) and a plain loop (one merged model per λ). The
    curves are compared: ``max_abs_diff`` is their largest loss difference.

    Returns:
        ``{"curve_seconds", "vmap_seconds", "loop_seconds", "vmap_over_curve", "loop_over_curve",
        "point_images_per_s", "max_abs_diff", "points", "images", "chunk", "threads"}``.
    """
    import torch.nn.functional as F

    from compolab.compose import merge
    from compolab.probes import Interpolation, ProbeData, default_lambdas, interpolate

    with cpu_threads(threads):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        backbone = make_backbone(TINY_VIT).requires_grad_(False).eval()
        theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
        tau = random_modules("lora", theta0, names, 1, gen)[0].delta(theta0).detach()
        theta0 = {n: theta0[n] for n in names}
        head = new_head(TINY_VIT.embed_dim, num_classes, generator=gen).requires_grad_(False)
        x = torch.randn(images, 3, TINY_VIT.img_size, TINY_VIT.img_size, generator=gen)
        y = torch.randint(num_classes, (images,), generator=gen)
        data = ProbeData({0: x}, {0: y})
        lambdas = default_lambdas(-0.5, 2.0, points)

        def curve_of(per_forward: int) -> Callable[[], Interpolation]:
            return lambda: interpolate(backbone, theta0, tau, data, head, lambdas, chunk=per_forward,
                                       progress=False)  # fmt: skip

        @torch.no_grad()
        def loop() -> list[float]:
            models = (merge(backbone, theta0, [tau], [lam]) for lam in lambdas)
            return [F.cross_entropy(head(model(x)), y).item() for model in models]

        curve_seconds, curve = timed(curve_of(1))
        vmap_seconds, vmapped = timed(curve_of(chunk))
        loop_seconds, looped = timed(loop)
        used_threads = torch.get_num_threads()
    return {
        "curve_seconds": round(curve_seconds, 3),
        "vmap_seconds": round(vmap_seconds, 3),
        "loop_seconds": round(loop_seconds, 3),
        "vmap_over_curve": round(vmap_seconds / curve_seconds, 2),
        "loop_over_curve": round(loop_seconds / curve_seconds, 2),
        "point_images_per_s": round(points * images / curve_seconds),
        "max_abs_diff": max(
            abs(a - b) for other in (vmapped.loss[0], looped)
            for a, b in zip(curve.loss[0], other, strict=True)
        ),
        "points": points,
        "images": images,
        "chunk": chunk,
        "threads": used_threads,
    }
