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
        levels: int | Sequence[float] = 20,
        log: bool = True,
        colorbar: bool = True,
    ):
        """Filled contours of ``metric`` (log10 of the loss by default) with the marks; returns ``ax``.

        ``levels``: a number of levels, or explicit levels (in log10 units when ``log``) to share
        one colour scale between planes.
        """
        import matplotlib.pyplot as plt
        import numpy as np

        if metric not in ("loss", "accuracy"):
            raise ConfigError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
        ax = ax or plt.gca()
        z = np.asarray(self.loss if metric == "loss" else self.accuracy)
        label = metric
        if metric == "loss" and log:
            z, label = np.log10(z), "log10 loss"
        cs = ax.contourf(self.a, self.b, z, levels=levels, cmap="viridis" if metric == "loss" else "magma")
        if colorbar:
            ax.figure.colorbar(cs, ax=ax, label=label)
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
