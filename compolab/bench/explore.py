"""``compolab bench explore``: how live the composition explorer is on this machine.

The explorer is built on the shipped tiny θ0 with random LoRA-sized modules, random task heads and
random images (the timings do not depend on what the images show), the shape of a tiny-preset pool.
"""

from __future__ import annotations

import torch

from compolab.bench.timing import timed
from compolab.explore.engine import Explorer
from compolab.heads import IncrementalHead, new_head
from compolab.models import load_backbone, theta0_of, tuned_weight_names
from compolab.probes import ProbeData
from compolab.task_vector import TaskVector

__all__ = ["bench_explore", "random_explorer", "random_parts"]


def random_parts(
    *, modules: int = 5, per_task: int = 64, classes: int = 10, scale: float = 0.02, seed: int = 0
) -> tuple:
    """``(backbone, theta0, taus, head, data)``: the shipped θ0, ``modules`` random modules (entries
    ~ N(0, ``scale``²)), one random ``classes``-way head per task, ``per_task`` random images per task."""
    gen = torch.Generator().manual_seed(seed)
    backbone, _ = load_backbone()
    theta0 = theta0_of(backbone, tuned_weight_names(backbone))
    taus = {
        t: TaskVector({n: scale * torch.randn(v.shape, generator=gen) for n, v in theta0.items()})
        for t in range(modules)
    }
    head = IncrementalHead([new_head(backbone.num_features, classes, generator=gen) for _ in range(modules)])
    size = backbone.patch_embed.img_size[0]
    x = {t: torch.randn(per_task, 3, size, size, generator=gen) for t in range(modules)}
    y = {t: torch.randint(classes, (per_task,), generator=gen) + t * classes for t in range(modules)}
    return backbone, theta0, taus, head, ProbeData(x, y)


def random_explorer(**kwargs) -> Explorer:
    """An explorer over :func:`random_parts` (same arguments)."""
    return Explorer(*random_parts(**kwargs))


def _quantiles(ms: list[float]) -> dict[str, float]:
    """Median and 90th percentile of latencies in milliseconds, rounded to 0.01 ms."""
    s = sorted(ms)
    return {"median_ms": round(s[len(s) // 2], 2), "p90_ms": round(s[min(len(s) - 1, int(0.9 * len(s)))], 2)}


def bench_explore(
    *, modules: int = 5, per_task: int = 64, repeats: int = 30, widget: bool = True, seed: int = 0
) -> dict:
    """Latency of an edit: a weight change (one forward of the blocks on the cached stem), a head-only
    change (cached logits), the quadratic prediction alone, and a widget refresh (edit + figure).

    Returns:
        ``{"weight_change": {"median_ms", "p90_ms"}, "head_only": {…}, "quadratic": {…},
        "widget_refresh": {…}, "build_seconds", "images", "modules", "threads", "repeats"}``.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    build, ex = timed(lambda: random_explorer(modules=modules, per_task=per_task, seed=seed))
    weights = torch.rand(repeats, modules, generator=gen).tolist()
    out: dict = {"build_seconds": round(build, 2)}
    times = []
    for w in weights:
        times.append(1e3 * ex.evaluate(ex.edit(coefs=tuple(w))).seconds)
    out["weight_change"] = _quantiles(times)
    times = []
    for i, w in enumerate(weights):  # same weights: the logits are cached, only the heads change
        edit = ex.edit(coefs=tuple(w), heads="composed" if i % 2 else "all")
        times.append(1e3 * ex.evaluate(edit).seconds)
    out["head_only"] = _quantiles(times[len(times) - min(len(times), ex._cache_size) :])
    times = []
    for w in weights:
        times.append(1e3 * timed(lambda w=w: ex.quadratic.predict(w))[0])
    out["quadratic"] = _quantiles(times)
    if widget:
        from compolab.explore.widget import ExplorerWidget

        w = ExplorerWidget(ex, plane_steps=5, debounce=0)
        times, draws = [], []
        for values in weights[: max(5, repeats // 3)]:
            w.sliders[0].value = round(values[0] * 1.5, 2)
            times.append(w.timings["update_ms"])
            draws.append(w.timings["draw_ms"])
        out["widget_refresh"] = _quantiles(times)
        out["widget_draw"] = _quantiles(draws)
    out.update(images=per_task * modules, modules=modules, threads=torch.get_num_threads(), repeats=repeats)
    return out
