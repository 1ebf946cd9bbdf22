r"""1-D probes: the loss along a straight path through the weight space of θ0's model.

* :func:`interpolate` — θ0 + λτ for one module (or any direction);
* :func:`composed_path` — θ0 + λ·Σ_t w_t τ_t, the path to the composition;
* :func:`segment` — the straight path between two models, e.g. a module and the composition.

Each returns an :class:`Interpolation`: per-task loss and accuracy at every λ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from compolab.errors import ConfigError
from compolab.probes.engine import (
    Criterion,
    ProbeData,
    check_directions,
    cross_entropy,
    evaluate_points,
    int_keys,
    mean_over,
    per_task,
)
from compolab.task_vector import TaskVector

__all__ = ["DEFAULT_LAMBDAS", "default_lambdas", "Interpolation", "interpolate", "composed_path", "segment"]


def default_lambdas(lo: float = -0.5, hi: float = 2.0, steps: int = 41) -> list[float]:
    """``steps`` evenly spaced λ in [lo, hi] (default [−0.5, 2] in 41 points: a step of 1/16).

    Raises:
        ConfigError: ``steps < 2`` or ``hi <= lo``.

    Examples:
        >>> default_lambdas(0.0, 1.0, 5)
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if steps < 2 or not hi > lo:
        raise ConfigError(f"a λ range needs steps >= 2 and hi > lo, got [{lo}, {hi}] with {steps} steps")
    return [round(lo + (hi - lo) * i / (steps - 1), 10) for i in range(steps)]


DEFAULT_LAMBDAS = tuple(default_lambdas())


@dataclass
class Interpolation:
    r"""Loss and accuracy along :math:`\theta_0 + \lambda\,\tau`.

    Attributes:
        lambdas: The λ values.
        loss: ``{task: loss at each λ}``.
        accuracy: ``{task: accuracy (%) at each λ}``.
        label: Name of the direction (``"τ2"``, ``"composed"``).
        own: The direction's own task(s); the others are "other tasks" in :meth:`plot`.
    """

    lambdas: list[float]
    loss: dict[int, list[float]]
    accuracy: dict[int, list[float]]
    label: str = "τ"
    own: tuple[int, ...] = ()

    def mean(self, metric: str = "loss", tasks: Sequence[int] | None = None) -> list[float]:
        """Mean over ``tasks`` (default: all probed tasks) of ``metric`` at each λ."""
        return mean_over(self._metric(metric), tasks)

    def at(self, lam: float, metric: str = "loss", tasks: Sequence[int] | None = None) -> float:
        """The mean ``metric`` at the probed λ closest to ``lam``."""
        i = min(range(len(self.lambdas)), key=lambda k: abs(self.lambdas[k] - lam))
        return self.mean(metric, tasks)[i]

    def groups(self) -> dict[str, list[int]]:
        """``{"own task": […], "other tasks": […]}`` (or ``{"all tasks": …}`` without ``own``)."""
        tasks = sorted(self.loss)
        own = [t for t in tasks if t in self.own]
        others = [t for t in tasks if t not in self.own]
        if not own:
            return {"all tasks": tasks}
        return {
            "own task" if len(own) == 1 else "own tasks": own,
            **({"other tasks": others} if others else {}),
        }

    def _metric(self, metric: str) -> dict[int, list[float]]:
        if metric not in ("loss", "accuracy"):
            raise ConfigError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
        return self.loss if metric == "loss" else self.accuracy

    def plot(self, ax=None, *, metric: str = "loss", by: str = "group", **kwargs):
        """One line per group of tasks (own / others) or per task (``by="task"``); returns ``ax``."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        if by not in ("group", "task"):
            raise ConfigError(f"by must be 'group' or 'task', got {by!r}")
        lines = self.groups() if by == "group" else {f"task {t}": [t] for t in sorted(self.loss)}
        styles = ["-", "--", ":", "-."]
        for i, (name, tasks) in enumerate(lines.items()):
            style = dict(ls=styles[i % len(styles)] if by == "group" else "-", **kwargs)
            ax.plot(self.lambdas, self.mean(metric, tasks), label=f"{self.label}: {name}", **style)
        for x in (0.0, 1.0):
            ax.axvline(x, c="grey", lw=0.8, ls=":")
        ax.set(xlabel="λ", ylabel=metric if metric == "loss" else "accuracy (%)")
        return ax

    def to_json(self) -> dict:
        """A JSON-ready dict (:meth:`from_json` reads it back)."""
        return {"kind": "interpolation", **asdict(self), "own": list(self.own)}

    @classmethod
    def from_json(cls, data: Mapping) -> Interpolation:
        """Read :meth:`to_json`'s output."""
        return cls(list(data["lambdas"]), int_keys(data["loss"]), int_keys(data["accuracy"]),
                   data.get("label", "τ"), tuple(data.get("own", ())))  # fmt: skip


def interpolate(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    data: ProbeData,
    head: nn.Module,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    label: str = "τ",
    own: Sequence[int] = (),
    criterion: Criterion = cross_entropy,
    chunk: int | None = None,
    batch_size: int = 512,
    progress: bool | None = True,
) -> Interpolation:
    r"""The 1-D probe: loss and accuracy at :math:`\theta_0 + \lambda\tau` for each λ, on every task.

    Args:
        backbone, theta0, data, head, criterion, chunk, batch_size, progress: As in
            :func:`~compolab.probes.engine.evaluate_points`.
        tau: The direction τ (a module's task vector).
        lambdas: The λ values.
        label: Name of the direction in the result.
        own: The direction's own task(s).

    Raises:
        ConfigError: No λ, or τ not matching θ0.

    Examples:
        >>> import torch
        >>> net = nn.Linear(2, 2, bias=False)
        >>> data = ProbeData({0: torch.eye(2)}, {0: torch.tensor([0, 1])})
        >>> tau = {"weight": torch.eye(2)}
        >>> curve = interpolate(net, {"weight": torch.zeros(2, 2)}, tau, data, nn.Identity(), [0.0, 5.0],
        ...                     progress=False)
        >>> round(curve.loss[0][0], 4), curve.accuracy[0][1]  # log 2 at θ0; perfect at λ = 5
        (0.6931, 100.0)
    """
    lambdas = [float(v) for v in lambdas]
    if not lambdas:
        raise ConfigError("interpolate needs at least one λ")
    loss, acc = evaluate_points(backbone, theta0, [tau], [[v] for v in lambdas], data, head,
                                criterion=criterion, chunk=chunk, batch_size=batch_size,
                                progress=progress, desc=f"interpolate {label}")  # fmt: skip
    return Interpolation(lambdas, per_task(loss, data.tasks), per_task(acc, data.tasks), label, tuple(own))


def composed_path(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    taus: Sequence[Mapping[str, Tensor]],
    data: ProbeData,
    head: nn.Module,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    coefs: Sequence[float] | None = None,
    own: Sequence[int] = (),
    label: str = "composed",
    **kwargs,
) -> Interpolation:
    r"""The path :math:`\theta_0 + \lambda\sum_t w_t\tau_t` (default :math:`w_t = 1/T`) to the composition.

    Keyword arguments go to :func:`interpolate`.

    Raises:
        ConfigError: No module, one weight per module missing, or modules not matching θ0.
    """
    if not taus:
        raise ConfigError("composed_path needs at least one module")
    coefs = [1.0 / len(taus)] * len(taus) if coefs is None else list(coefs)
    if len(coefs) != len(taus):
        raise ConfigError(f"got {len(coefs)} coefs for {len(taus)} modules")
    check_directions(theta0, taus)
    bar = sum(c * TaskVector(dict(tau)) for c, tau in zip(coefs, taus, strict=True))
    return interpolate(backbone, theta0, bar, data, head, lambdas, label=label, own=own, **kwargs)


def segment(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    start: Mapping[str, Tensor],
    end: Mapping[str, Tensor],
    data: ProbeData,
    head: nn.Module,
    steps: Sequence[float] = tuple(default_lambdas(0.0, 1.0, 11)),
    *,
    label: str = "segment",
    own: Sequence[int] = (),
    criterion: Criterion = cross_entropy,
    chunk: int | None = None,
    batch_size: int = 512,
    progress: bool | None = True,
) -> Interpolation:
    r"""The straight path :math:`\theta_0 + (1-s)\,\delta_{start} + s\,\delta_{end}` between two models.

    E.g. from a module (``start = taus[t]``) to the composition (``end`` = the mean of the modules):
    does the path cross a barrier? The returned curve's "λ" is s.

    Raises:
        ConfigError: No step, or ``start`` and ``end`` not matching θ0.
    """
    ss = [float(v) for v in steps]
    if not ss:
        raise ConfigError("segment needs at least one step")
    loss, acc = evaluate_points(backbone, theta0, [start, end], [[1.0 - v, v] for v in ss], data, head,
                                criterion=criterion, chunk=chunk, batch_size=batch_size,
                                progress=progress, desc=f"segment {label}")  # fmt: skip
    return Interpolation(ss, per_task(loss, data.tasks), per_task(acc, data.tasks), label, tuple(own))
