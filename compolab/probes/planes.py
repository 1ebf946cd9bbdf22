r"""2-D probes: the loss on the plane :math:`\theta_0 + a\,u + b\,v`.

With two modules as u and v the plane holds θ0 (0, 0), both modules (1, 0) and (0, 1) and their
composition (½, ½): does the composition stay in the pre-training basin with them?
:func:`filter_normalized_direction` gives the random directions of Li et al. (2018) to compare with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from compolab.errors import ConfigError
from compolab.probes.engine import Criterion, ProbeData, cross_entropy, evaluate_points, int_keys
from compolab.probes.paths import default_lambdas
from compolab.task_vector import TaskVector

__all__ = ["Plane", "plane", "filter_normalized_direction"]


@dataclass
class Plane:
    r"""The mean loss / accuracy over tasks on the grid :math:`\theta_0 + a\,u + b\,v`.

    Attributes:
        a, b: Grid coordinates along u and v.
        loss, accuracy: ``[len(b)][len(a)]`` means over the probed tasks.
        per_task_loss: ``{task: [len(b)][len(a)]}``.
        marks: Named points ``{label: (a, b)}`` drawn on the plot (θ0, the modules, their composition).
        labels: Names of u and v.
    """

    a: list[float]
    b: list[float]
    loss: list[list[float]]
    accuracy: list[list[float]]
    per_task_loss: dict[int, list[list[float]]]
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)
    labels: tuple[str, str] = ("u", "v")

    def value(self, a: float, b: float, metric: str = "loss") -> float:
        """The mean ``metric`` at the grid point closest to ``(a, b)``."""
        i = min(range(len(self.b)), key=lambda k: abs(self.b[k] - b))
        j = min(range(len(self.a)), key=lambda k: abs(self.a[k] - a))
        return (self.loss if metric == "loss" else self.accuracy)[i][j]

    def plot(
        self,
        ax=None,
        *,
        metric: str = "loss",
        levels: int | Sequence[float] | None = None,
        log: bool = True,
        colorbar: bool = True,
        vmin: float | None = None,
        vmax: float | None = None,
    ):
        """The grid as measured, one cell per point, with the marks; returns ``ax``.

        Each grid point is drawn as a flat cell (no interpolation), so a coarse grid looks coarse
        instead of showing made-up polygonal contours. With ``log`` the colour scale of the loss is
        logarithmic and the colour bar is labelled in loss values. Contour lines are added only on
        grids of at least 15 × 15 points.

        Args:
            ax: Axes to draw on (default: the current ones).
            metric: ``"loss"`` or ``"accuracy"``.
            levels: Contour lines: a number, or explicit values (log10 units when ``log``); explicit
                values also fix the colour range, so several planes share one scale.
            log: Logarithmic colour scale for the loss.
            colorbar: Draw the colour bar.
            vmin, vmax: The colour range (data units); default the range of ``levels`` or of the grid.
        """
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import LogNorm, Normalize

        if metric not in ("loss", "accuracy"):
            raise ConfigError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
        ax = ax or plt.gca()
        z = np.asarray(self.loss if metric == "loss" else self.accuracy, dtype=float)
        log = log and metric == "loss"
        if levels is not None and not isinstance(levels, int):
            bounds = 10.0 ** np.asarray(levels, float) if log else np.asarray(levels, float)
            vmin = bounds.min() if vmin is None else vmin
            vmax = bounds.max() if vmax is None else vmax
        norm = (LogNorm if log else Normalize)(vmin=vmin if vmin is not None else z.min(),
                                               vmax=vmax if vmax is not None else z.max())  # fmt: skip
        cmap = "viridis" if metric == "loss" else "magma"
        mesh = ax.pcolormesh(self.a, self.b, z, norm=norm, cmap=cmap, shading="nearest")
        if min(z.shape) >= 15:
            lines = levels if levels is not None else 10
            if isinstance(lines, int):
                lines = (np.geomspace if log else np.linspace)(norm.vmin, norm.vmax, lines + 2)[1:-1]
            elif log:
                lines = 10.0 ** np.asarray(lines, float)
            ax.contour(self.a, self.b, z, levels=lines, norm=norm, colors="white", linewidths=0.5, alpha=0.6)
        if colorbar:
            bar = ax.figure.colorbar(mesh, ax=ax, label=f"{metric} (log scale)" if log else metric)
            if log:  # ticks in loss values, not powers of ten
                bar.set_ticks(np.geomspace(norm.vmin, norm.vmax, 5), labels=[
                    f"{v:.3g}" for v in np.geomspace(norm.vmin, norm.vmax, 5)])  # fmt: skip
                bar.ax.minorticks_off()
        for name, (pa, pb) in self.marks.items():
            ax.plot(pa, pb, "o", ms=6, mec="white", mfc="black" if name == "θ0" else "tab:red")
            ax.annotate(name, (pa, pb), textcoords="offset points", xytext=(5, 5), color="white", fontsize=8)
        ax.set(xlabel=f"a  ({self.labels[0]})", ylabel=f"b  ({self.labels[1]})")
        ax.grid(False)
        return ax

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        d = asdict(self)
        d["marks"] = {k: list(v) for k, v in self.marks.items()}
        return {"kind": "plane", **d, "labels": list(self.labels)}

    @classmethod
    def from_json(cls, data: Mapping) -> Plane:
        """Read :meth:`to_json`'s output."""
        return cls(list(data["a"]), list(data["b"]), data["loss"], data["accuracy"],
                   int_keys(data["per_task_loss"]), {k: tuple(v) for k, v in data.get("marks", {}).items()},
                   tuple(data.get("labels", ("u", "v"))))  # fmt: skip


def plane(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    u: Mapping[str, Tensor],
    v: Mapping[str, Tensor],
    data: ProbeData,
    head: nn.Module,
    *,
    span: tuple[float, float] = (-0.5, 1.5),
    steps: int = 21,
    labels: tuple[str, str] = ("u", "v"),
    marks: Mapping[str, tuple[float, float]] | None = None,
    criterion: Criterion = cross_entropy,
    chunk: int | None = None,
    batch_size: int = 512,
    progress: bool | None = True,
) -> Plane:
    r"""The 2-D probe on the grid :math:`\theta_0 + a u + b v`, a, b in ``span`` (``steps`` each).

    With two modules as u and v the default marks are θ0 (0, 0), the modules (1, 0) and (0, 1) and
    their composition (½, ½).

    Args:
        backbone, theta0, data, head, criterion, chunk, batch_size, progress: As in
            :func:`~compolab.probes.engine.evaluate_points`.
        u, v: The two directions.
        span: The range of a and of b.
        steps: Grid points per axis.
        labels: Names of u and v.
        marks: Named points ``{label: (a, b)}`` (default: θ0, u, v and their composition).

    Raises:
        ConfigError: ``steps < 2``, an empty span, or directions not matching θ0.
    """
    if steps < 2 or not span[1] > span[0]:
        raise ConfigError(f"plane needs steps >= 2 and span[1] > span[0], got {span} with {steps} steps")
    grid = default_lambdas(span[0], span[1], steps)
    coefs = [[a, b] for b in grid for a in grid]  # row-major in b
    loss, acc = evaluate_points(backbone, theta0, [u, v], coefs, data, head, criterion=criterion,
                                chunk=chunk, batch_size=batch_size, progress=progress,
                                desc="plane")  # fmt: skip
    rows = lambda m: m.reshape(steps, steps).tolist()  # noqa: E731
    if marks is None:
        marks = {"θ0": (0.0, 0.0), labels[0]: (1.0, 0.0), labels[1]: (0.0, 1.0), "composed": (0.5, 0.5)}
    per_task = {t: rows(loss[:, k]) for k, t in enumerate(data.tasks)}
    return Plane(grid, grid, rows(loss.mean(1)), rows(acc.mean(1)), per_task, dict(marks), tuple(labels))


def filter_normalized_direction(
    theta0: Mapping[str, Tensor], *, generator: torch.Generator | None = None
) -> TaskVector:
    r"""A random direction scaled filter by filter to θ0 (Li et al., *Visualizing the Loss Landscape
    of Neural Nets*, NeurIPS 2018).

    Each filter — an output row of a weight matrix (or of a conv kernel) — is a Gaussian direction
    rescaled to the norm of the same row of θ0; one-dimensional parameters (biases, norms) get 0,
    as in the paper. Plots along such directions are comparable across layers and models.

    Examples:
        >>> w = {"w": torch.tensor([[3.0, 4.0], [0.0, 1.0]]), "b": torch.ones(2)}
        >>> d = filter_normalized_direction(w, generator=torch.Generator().manual_seed(0))
        >>> d["w"].norm(dim=1), d["b"]
        (tensor([5., 1.]), tensor([0., 0.]))
    """
    out = {}
    for name, w in theta0.items():
        if w.ndim < 2:
            out[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        rows, d_rows = w.reshape(len(w), -1), d.reshape(len(d), -1)
        scale = rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out[name] = (d_rows * scale).reshape(w.shape)
    return TaskVector(out)
