"""``compolab probe``: run one probe of a pool, write its JSON record and, optionally, a figure.

:func:`probe_pool` checks every input before any work (output paths, task ids, the λ grid, the
number of plane directions, a saved Fisher when asked for), then probes and writes. ``compolab.cli`` only
parses the command line and prints the summary this returns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from compolab.distributed import current_world
from compolab.errors import ConfigError
from compolab.pool import Pool
from compolab.probes.curvatures import probe_curvature
from compolab.probes.jensen import jensen_gap
from compolab.probes.paths import Interpolation, default_lambdas, interpolate
from compolab.probes.planes import filter_normalized_direction, plane
from compolab.probes.pool import PoolProbe, open_pool_probe
from compolab.probes.taylor import SecondOrder, second_order

__all__ = ["PROBES", "CURVATURES", "PLOT_SUFFIXES", "check_outputs", "check_tasks", "probe_pool"]

#: The probes of ``compolab probe``.
PROBES = ("interpolate", "plane", "jensen")
#: ``curvature`` of :func:`probe_pool` (``--second-order`` of ``probe interpolate``): the prediction's
#: curvature, or none. ``diagonal`` is the Fisher the run kept; ``kfac`` the K-FAC of the probes' loss
#: at θ0 on the probe images (:func:`~compolab.probes.curvatures.probe_curvature`).
CURVATURES = ("none", "fisher", "hessian", "diagonal", "kfac")
#: ``curvature`` of the ``jensen`` probe (``--curvature``): ``fisher`` (Ω exact on the modules' span,
#: and with the run's diagonal Fisher when it kept one) or ``all`` (exact, K-FAC and the exact
#: diagonal, the last two on the probe images: one loss, three approximations).
JENSEN_CURVATURES = ("fisher", "all")
#: Figure formats of ``--plot``.
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def check_outputs(out: str | Path, plot: str | Path | None) -> tuple[Path, Path | None]:
    """``out`` and ``plot`` as paths: a .json file and a figure, both in existing folders.

    Raises:
        ConfigError: A wrong suffix or a missing folder.
    """
    out_path = Path(out)
    if out_path.suffix != ".json":
        raise ConfigError(f"`out` must name a .json file, got {str(out)!r}")
    plot_path = Path(plot) if plot else None
    if plot_path is not None and plot_path.suffix not in PLOT_SUFFIXES:
        raise ConfigError(f"`plot` must end in one of {', '.join(PLOT_SUFFIXES)}, got {str(plot)!r}")
    for path in (out_path, plot_path):
        if path is not None and not path.parent.is_dir():
            raise ConfigError(f"folder {path.parent} does not exist (for {path.name})")
    return out_path, plot_path


def check_tasks(tasks: Sequence[int] | None, available: Sequence[int]) -> list[int]:
    """The modules to probe: ``tasks`` (distinct, all in the pool) or, by default, all of them.

    Raises:
        ConfigError: An empty list, a repeated task or one the pool does not hold.
    """
    if tasks is None:
        return list(available)
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks) or any(t not in available for t in tasks):
        raise ConfigError(f"`tasks` {','.join(map(str, tasks))}: the pool holds tasks {list(available)}")
    return tasks


def probe_pool(
    kind: str,
    pool: str | Path,
    out: str | Path,
    *,
    plot: str | Path | None = None,
    tasks: Sequence[int] | None = None,
    split: str = "train",
    per_task: int = 50,
    seed: int = 0,
    lambda_range: tuple[float, float] = (-0.5, 2.0),
    span: tuple[float, float] = (-0.5, 1.5),
    steps: int | None = None,
    composed: bool = False,
    curvature: str = "fisher",
    random: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """Probe a pool, write the record to ``out`` (JSON) and the figure to ``plot``; returns a summary.

    Args:
        kind: ``interpolate`` (θ0 + λτ_t for each module, with the second-order prediction),
            ``plane`` (θ0 + a·u + b·v) or ``jensen`` (the composition gap against Ω).
        pool: The pool folder (a run's ``pool/``).
        out: The record (.json), in an existing folder.
        plot: The figure (.png, .pdf or .svg), optional.
        tasks: The modules to probe (default: all; a plane takes the first ``2 - random``).
        split, per_task, seed: The probe images (:meth:`~compolab.probes.ProbeData.from_benchmark`);
            ``seed`` also draws the random directions.
        lambda_range: λ range of ``interpolate``.
        span: a, b range of ``plane``.
        steps: λ values (default 41) or grid points per axis (default 21).
        composed: ``interpolate`` also along θ0 + λ·mean τ.
        curvature: The curvature of ``interpolate``'s prediction, one of :data:`CURVATURES`; of
            ``jensen``'s Ω, one of :data:`JENSEN_CURVATURES`.
        random: Filter-normalised random directions of ``plane`` (0, 1 or 2) in place of modules.
        progress: Show progress bars.
        device: Where the probes run. Under ``torchrun`` every rank evaluates its share of the
            points (:func:`~compolab.probes.engine.evaluate_points`) and rank 0 alone writes.

    Raises:
        ConfigError: Any bad input, before any probe runs and before anything is written.
    """
    if kind not in PROBES:
        raise ConfigError(f"unknown probe {kind!r}; choose one of {', '.join(PROBES)}")
    allowed = JENSEN_CURVATURES if kind == "jensen" else CURVATURES
    if curvature not in allowed:
        raise ConfigError(f"`curvature` of the {kind} probe must be one of {', '.join(allowed)}, "
                          f"got {curvature!r}")
    if random not in (0, 1, 2):
        raise ConfigError(f"a plane takes 0, 1 or 2 random directions, got {random}")
    out_path, plot_path = check_outputs(out, plot)
    opened = Pool.open(pool)
    chosen = check_tasks(tasks, opened.tasks())
    if kind == "interpolate":
        lambdas = default_lambdas(*lambda_range, 41 if steps is None else steps)
    elif kind == "plane":
        if tasks is None:
            chosen = chosen[: 2 - random]
        if len(chosen) + random != 2:
            raise ConfigError(f"a plane needs 2 directions: {len(chosen)} module(s) + `random` {random}")
        steps = 21 if steps is None else steps
        default_lambdas(*span, steps)  # validates the grid
    pp = open_pool_probe(opened, split=split, per_task=per_task, seed=seed, device=device)
    if kind == "interpolate" and curvature == "diagonal" and pp.fisher is None:
        raise ConfigError(f"{pool}: no diagonal Fisher saved next to this pool (ITA / IEL runs keep one)")
    record: dict = {"probe": kind, "pool": str(pool), "split": split, "per_task": per_task}
    summary: dict = {"probe": kind, "out": str(out_path)}
    predictions: list[SecondOrder] = []
    if kind == "interpolate":
        results, predictions = _curves(pp, chosen, lambdas, composed, curvature, progress)
        record["curves"] = [c.to_json() for c in results]
        record["second_order"] = [p.to_json() for p in predictions]
        summary["loss_at_0_and_1"] = {
            c.label: [round(c.at(0.0, tasks=c.own), 4), round(c.at(1.0, tasks=c.own), 4)] for c in results
        }
    elif kind == "plane":
        gen = torch.Generator().manual_seed(seed)
        directions = [pp.taus[t] for t in chosen]
        labels = [f"τ{t}" for t in chosen]
        for i in range(random):
            directions.append(filter_normalized_direction(pp.theta0, generator=gen))
            labels.append(f"random {i}")
        marks = {"θ0": (0.0, 0.0)}
        marks.update({labels[i]: ((1.0, 0.0), (0.0, 1.0))[i] for i in range(len(chosen))})
        if len(chosen) == 2:
            marks["composed"] = (0.5, 0.5)
        result = plane(pp.backbone, pp.theta0, *directions, pp.data, pp.head, span=tuple(span), steps=steps,
                       labels=tuple(labels), marks=marks, progress=progress)  # fmt: skip
        record["plane"] = result.to_json()
        summary["loss_at_marks"] = {k: round(result.value(*v), 4) for k, v in marks.items()}
        results = [result]
    else:
        taus = {t: pp.taus[t] for t in chosen}
        fisher, kfac = pp.fisher, None
        if curvature == "all":
            fisher, kfac = (probe_curvature(c, pp.backbone, pp.theta0, pp.head, pp.data)
                            for c in ("diagonal", "kfac"))  # fmt: skip
        result = jensen_gap(pp.backbone, pp.theta0, taus, pp.data, pp.head, fisher=fisher, kfac=kfac,
                            progress=progress)  # fmt: skip
        record["jensen"] = result.to_json()
        record["curvature"] = curvature
        summary["measured"] = [round(v, 4) for v in result.measured]
        for name, values in result.omegas().items():
            summary["omega" if name == "fisher" else f"omega_{name}"] = [round(v, 4) for v in values]
        summary["omega_error"] = {name: [round(e, 4) for e in result.omega_error(name)]
                                  for name in result.omegas()}  # fmt: skip
        results = [result]
    if not current_world().is_main:
        return summary
    out_path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    if plot_path is not None:
        _plot(kind, results, predictions, plot_path)
        summary["plot"] = str(plot_path)
    return summary


def _curves(
    pp: PoolProbe, tasks: list[int], lambdas: list[float], composed: bool, curvature: str, progress: bool
) -> tuple[list[Interpolation], list[SecondOrder]]:
    """θ0 + λτ_t for each module (and the composition), with the second-order predictions."""
    curves = [(f"τ{t}", [t], pp.taus[t]) for t in tasks]
    if composed:
        curves.append(("composed", list(tasks), sum(pp.taus[t] for t in tasks) / len(tasks)))
    results, predictions = [], []
    c = pp.fisher if curvature == "diagonal" else curvature
    if curvature == "kfac":
        c = probe_curvature("kfac", pp.backbone, pp.theta0, pp.head, pp.data)
    for label, own, tau in curves:
        results.append(interpolate(pp.backbone, pp.theta0, tau, pp.data, pp.head, lambdas, label=label,
                                   own=own, progress=progress))  # fmt: skip
        if curvature != "none":
            predictions.append(second_order(pp.backbone, pp.theta0, tau, pp.data, pp.head, curvature=c,
                                            label=label, progress=progress))  # fmt: skip
    return results, predictions


def _plot(kind: str, results: list, predictions: list[SecondOrder], path: Path) -> None:
    """The figure of a probe: loss and accuracy curves, the plane's contours or the gap against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compolab.plotting import use_style

    use_style()
    if kind == "interpolate":
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
        by_label = {p.label: p for p in predictions}
        for i, curve in enumerate(results):
            color = f"C{i % 10}"
            curve.plot(axes[0], metric="loss", color=color)
            curve.plot(axes[1], metric="accuracy", color=color)
            if curve.label in by_label:
                by_label[curve.label].plot(axes[0], curve.lambdas, tasks=curve.own or None, color=color, lw=1,
                                           ls=(0, (1, 1)))  # fmt: skip
        axes[0].legend(fontsize=7)
        axes[0].set_title("loss along θ0 + λτ")
        axes[1].set_title("accuracy along θ0 + λτ")
    else:
        fig, ax = plt.subplots(figsize=(5.5, 4.2), layout="constrained")
        results[0].plot(ax)
        if kind == "jensen":
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
