r"""Loss-landscape and basin probes around θ0 (spec §A.2.2: modules compose in the pre-training basin).

Every probe measures one fixed multi-task loss — the mean over tasks of each task's mean loss on
fixed probe images (:class:`ProbeData`), with one fixed head — at points of a low-dimensional
subspace through θ0:

.. math:: \theta = \theta_0 + \textstyle\sum_j c_j\, d_j ,

spanned by directions :math:`d_j` (modules τ_t, their average, filter-normalised random
directions). :func:`evaluate_points` is the engine: it stacks a chunk of points and runs them with
one :func:`torch.func.vmap` of the model (on a GPU; on the CPU, where the batched math attention
loses to the fused kernel on batches of a few hundred images, one point at a time). A curve costs
points × images forwards: on 2 CPU cores ≈ 1,200 point-images per second for the tiny ViT, so a
41-point curve on 50 images of each of 5 tasks takes ≈ 8 s (``compolab bench probe``).

* :func:`interpolate` — the 1-D path θ0 + λτ (:class:`Interpolation`); :func:`composed_path` is the
  same along the composition θ0 + λ·Σ_t w_t τ_t, :func:`segment` the straight path between two
  models (a module and the composition).
* :func:`plane` — the 2-D plane θ0 + a·u + b·v (:class:`Plane`), e.g. through two modules, with
  their composition marked; :func:`filter_normalized_direction` gives Li et al.'s random directions.
* :func:`second_order` — the quadratic prediction of a curve from θ0 alone (:class:`SecondOrder`):
  :math:`\ell(\theta_0) + \lambda\, g^\top\tau + \tfrac12 \lambda^2\, \tau^\top C \tau` with the
  first-order term measured at θ0 and C the Fisher (exact along τ), the Hessian or a diagonal Fisher.
* :func:`jensen_gap` — measured mean individual loss minus composed loss, against the curvature
  estimate of Ω (spec §A.2.3), as the number of composed modules grows (:class:`JensenGap`).

Second derivatives are taken forward-over-reverse (``jvp(grad(·))``): in torch 2.15 the
forward-over-forward derivative of ``layer_norm`` is wrong (tests/test_probes.py guards this).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from compolab.curvature import math_attention
from compolab.errors import ConfigError
from compolab.fisher_store import DiagonalFisher
from compolab.linearize import linearized_forward
from compolab.task_vector import TaskVector

__all__ = [
    "Criterion",
    "cross_entropy",
    "ProbeData",
    "evaluate_points",
    "Interpolation",
    "interpolate",
    "composed_path",
    "segment",
    "Plane",
    "plane",
    "filter_normalized_direction",
    "SecondOrder",
    "second_order",
    "JensenGap",
    "jensen_gap",
    "PoolProbe",
    "open_pool_probe",
    "DEFAULT_LAMBDAS",
    "default_lambdas",
]

#: ``(outputs, targets) -> per-sample losses``.
Criterion = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy (the default criterion of every probe)."""
    return F.cross_entropy(outputs, targets, reduction="none")


def default_lambdas(lo: float = -0.5, hi: float = 2.0, steps: int = 41) -> list[float]:
    """``steps`` evenly spaced λ in [lo, hi] (default: the issue's [−0.5, 2], 41 points: step 1/16)."""
    if steps < 2 or not hi > lo:
        raise ConfigError(f"a λ range needs steps >= 2 and hi > lo, got [{lo}, {hi}] with {steps} steps")
    return [round(lo + (hi - lo) * i / (steps - 1), 10) for i in range(steps)]


DEFAULT_LAMBDAS = tuple(default_lambdas())


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ProbeData:
    """Fixed probe images per task, with targets as column indices of the probe head's outputs.

    Attributes:
        x: ``{task: images}``.
        y: ``{task: targets}`` (class columns for cross-entropy, or any target of the criterion).
    """

    x: dict[int, Tensor]
    y: dict[int, Tensor]

    def __post_init__(self) -> None:
        if not self.x or set(self.x) != set(self.y):
            raise ConfigError(f"ProbeData needs the same non-empty task ids in x and y, got "
                              f"{sorted(self.x)} and {sorted(self.y)}")  # fmt: skip
        bad = [t for t in self.x if len(self.x[t]) != len(self.y[t]) or len(self.x[t]) == 0]
        if bad:
            raise ConfigError(f"task(s) {bad}: images and targets differ in number, or are empty")

    @property
    def tasks(self) -> list[int]:
        """The task ids, sorted."""
        return sorted(self.x)

    @classmethod
    def from_benchmark(
        cls,
        bench,
        columns: Sequence[int],
        tasks: Sequence[int] | None = None,
        *,
        split: str = "train",
        per_task: int = 50,
        seed: int = 0,
    ) -> ProbeData:
        """``per_task`` seeded images of each task's ``split``, labels mapped to head columns.

        Args:
            bench: A :class:`~compolab.data.Benchmark`.
            columns: The global label of each output column of the probe head (e.g.
                ``IncrementalHead.global_labels``).
            tasks: Tasks to take images from (default: every task whose classes are all columns).
            split: ``train`` (the loss the modules minimise), ``val`` or ``test``.
            per_task: Images per task (all of them if the split is smaller).
            seed: Which images.

        Raises:
            ConfigError: Unknown split or task, ``per_task < 1``, or a class without a column.
        """
        if split not in ("train", "val", "test"):
            raise ConfigError(f"split must be train, val or test, got {split!r}")
        if per_task < 1:
            raise ConfigError(f"per_task must be >= 1, got {per_task}")
        index = {int(c): i for i, c in enumerate(columns)}
        if tasks is None:
            tasks = [t.index for t in bench.tasks if all(int(c) in index for c in t.classes)]
        bad = [t for t in tasks if not 0 <= t < bench.num_tasks]
        if bad:
            raise ConfigError(f"unknown task id(s) {bad}; the benchmark has tasks 0..{bench.num_tasks - 1}")
        xs, ys = {}, {}
        for t in tasks:
            missing = [int(c) for c in bench.tasks[t].classes if int(c) not in index]
            if missing:
                raise ConfigError(f"task {t}: classes {missing} have no column in the probe head")
            data = getattr(bench.tasks[t], split)
            if len(data) == 0:
                raise ConfigError(f"task {t} has no {split} images")
            gen = torch.Generator().manual_seed(seed + t)
            pick = torch.randperm(len(data), generator=gen)[:per_task].tolist()
            x, y = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(data, pick), len(pick))))
            xs[t], ys[t] = x, torch.tensor([index[int(c)] for c in y])
        return cls(xs, ys)


# --------------------------------------------------------------------------- engine


def _check_directions(theta0: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """The common names of ``directions``; errors name the keys that do not match."""
    if not directions:
        raise ConfigError("a probe needs at least one direction")
    names = list(directions[0])
    for j, d in enumerate(directions):
        if set(d) != set(names):
            raise ConfigError(f"direction {j} differs from direction 0 in keys {sorted(set(d) ^ set(names))}")
    missing = [n for n in names if n not in theta0]
    if missing:
        raise ConfigError(f"direction keys not in theta0: {missing}")
    bad = [n for n in names if any(d[n].shape != theta0[n].shape for d in directions)]
    if bad:
        raise ConfigError(f"direction shapes differ from theta0 on {bad}")
    return names


def _batches(x: Tensor, y: Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


@torch.no_grad()
def evaluate_points(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coefs: Tensor | Sequence[Sequence[float]],
    data: ProbeData,
    head: nn.Module,
    *,
    criterion: Criterion = cross_entropy,
    chunk: int | None = None,
    batch_size: int = 512,
    progress: bool | None = True,
    desc: str = "probe",
) -> tuple[Tensor, Tensor]:
    r"""Loss and accuracy of ``head ∘ backbone`` at :math:`\theta_0 + \sum_j c_{pj} d_j` for every point p.

    ``chunk`` points at a time run as one :func:`torch.func.vmap` of the model (attention through
    the math kernel, which vmap batches; the fused CPU kernel has no batching rule); with
    ``chunk=1`` every point is a plain forward with the fused kernel. The default (``None``) is
    1 on the CPU, where vmap gains nothing on batches of a few hundred images (``compolab bench
    probe``), and 8 on a GPU.

    Args:
        backbone: The model at θ0 (eval mode; parameters not in the directions stay as they are).
        theta0: :math:`\theta_0`, at least the directions' names.
        directions: :math:`d_j`, task vectors with the same keys.
        coefs: ``(P, J)`` coefficients, one row per point.
        data: The probe images.
        head: Features → outputs (fixed at every point).
        criterion: ``(outputs, targets) -> per-sample losses``.
        chunk: Points per vmapped forward (memory ∝ chunk · batch_size); default by device.
        batch_size: Images per forward.
        progress: Show a progress bar over the chunks.
        desc: Its label.

    Returns:
        ``(loss, accuracy)``, each ``(P, T)`` for the T tasks of ``data`` (sorted ids); accuracy is
        in percent, NaN when the targets are not class indices.

    Raises:
        ConfigError: Mismatched directions (the keys are named) or coefficients of the wrong shape.
    """
    names = _check_directions(theta0, directions)
    like = theta0[names[0]]
    coefs = torch.as_tensor(coefs, dtype=like.dtype, device=like.device)
    if coefs.ndim != 2 or coefs.shape[1] != len(directions) or len(coefs) == 0:
        raise ConfigError(f"coefs must be (points, {len(directions)}), got {tuple(coefs.shape)}")
    if chunk is None:
        chunk = 1 if like.device.type == "cpu" else 8
    if chunk < 1 or batch_size < 1:
        raise ConfigError(f"chunk and batch_size must be >= 1, got {chunk} and {batch_size}")
    stacked = {n: torch.stack([d[n].to(like) for d in directions]) for n in names}  # (J, *shape)
    tasks = data.tasks
    loss = torch.zeros(len(coefs), len(tasks), dtype=torch.float64)
    acc = torch.zeros_like(loss)

    def outputs(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return head(functional_call(backbone, params, (x,)))

    def batched(params: dict[str, Tensor], x: Tensor) -> Tensor:  # (p, B, C)
        if chunk == 1:  # one point: a plain forward, fused attention
            return outputs({n: v[0] for n, v in params.items()}, x)[None]
        return vmap(outputs, in_dims=(0, None))(params, x)

    was_training = backbone.training
    backbone.eval()
    starts = range(0, len(coefs), chunk)
    with math_attention(backbone) if chunk > 1 else contextlib.nullcontext():
        for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
            c = coefs[s : s + chunk]
            params = {n: theta0[n].to(like) + torch.tensordot(c, stacked[n], dims=1) for n in names}
            for k, t in enumerate(tasks):
                total, correct = (
                    torch.zeros(len(c), dtype=torch.float64),
                    torch.zeros(len(c), dtype=torch.float64),
                )
                for x, y in _batches(data.x[t], data.y[t], batch_size):
                    x, y = x.to(like.device), y.to(like.device)
                    out = batched(params, x)
                    flat_y = y.expand(len(c), *y.shape).reshape(-1, *y.shape[1:])
                    per_sample = criterion(out.reshape(-1, *out.shape[2:]), flat_y).reshape(len(c), -1)
                    total += per_sample.sum(1).double().cpu()
                    if not y.is_floating_point() and out.ndim == 3:
                        correct += (out.argmax(-1) == y).sum(1).double().cpu()
                n = len(data.y[t])
                loss[s : s + len(c), k] = total / n
                acc[s : s + len(c), k] = (
                    100.0 * correct / n if not data.y[t].is_floating_point() else math.nan
                )
    backbone.train(was_training)
    return loss, acc


def _per_task(values: Tensor, tasks: Sequence[int]) -> dict[int, list[float]]:
    return {t: values[:, k].tolist() for k, t in enumerate(tasks)}


def _mean_over(per_task: Mapping[int, Sequence[float]], tasks: Sequence[int] | None) -> list[float]:
    tasks = list(per_task) if tasks is None else list(tasks)
    missing = [t for t in tasks if t not in per_task]
    if missing:
        raise ConfigError(f"task(s) {missing} were not probed; probed: {sorted(per_task)}")
    if not tasks:
        raise ConfigError("no task to average over")
    rows = torch.tensor([list(per_task[t]) for t in tasks], dtype=torch.float64)
    return rows.mean(0).tolist()


def _int_keys(d: Mapping) -> dict:
    return {int(k): v for k, v in d.items()}


# --------------------------------------------------------------------------- 1-D


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
        return _mean_over(self._metric(metric), tasks)

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
        return cls(list(data["lambdas"]), _int_keys(data["loss"]), _int_keys(data["accuracy"]),
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

    Examples:
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
    return Interpolation(lambdas, _per_task(loss, data.tasks), _per_task(acc, data.tasks), label, tuple(own))


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
    """
    if not taus:
        raise ConfigError("composed_path needs at least one module")
    coefs = [1.0 / len(taus)] * len(taus) if coefs is None else list(coefs)
    if len(coefs) != len(taus):
        raise ConfigError(f"got {len(coefs)} coefs for {len(taus)} modules")
    _check_directions(theta0, taus)
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
    """
    ss = [float(v) for v in steps]
    if not ss:
        raise ConfigError("segment needs at least one step")
    loss, acc = evaluate_points(backbone, theta0, [start, end], [[1.0 - v, v] for v in ss], data, head,
                                criterion=criterion, chunk=chunk, batch_size=batch_size,
                                progress=progress, desc=f"segment {label}")  # fmt: skip
    return Interpolation(ss, _per_task(loss, data.tasks), _per_task(acc, data.tasks), label, tuple(own))


# --------------------------------------------------------------------------- 2-D


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
                   _int_keys(data["per_task_loss"]), {k: tuple(v) for k, v in data.get("marks", {}).items()},
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


# --------------------------------------------------------------------------- second order


def _scalar_derivatives(fn: Callable[[Tensor], Tensor], like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(fn(0), fn'(0), fn''(0))`` of a scalar function, the second one forward-over-reverse."""
    s, one = (
        torch.zeros((), dtype=like.dtype, device=like.device),
        torch.ones((), dtype=like.dtype, device=like.device),
    )
    value, first = jvp(fn, (s,), (one,))
    second = jvp(grad(fn), (s,), (one,))[1]
    return value.detach(), first.detach(), second.detach()


def _output_jvp(backbone, head, theta0, names, tau, x) -> tuple[Tensor, Tensor]:
    """``(z0, J τ)``: outputs at θ0 and their derivative along τ (the head is fixed: zero tangent)."""
    tangent = {n: tau[n].to(theta0[n]) for n in names}
    return linearized_forward(backbone, theta0, tangent, x, head=head)


@dataclass
class SecondOrder:
    r"""The quadratic prediction :math:`\hat\ell(\lambda) = \ell(\theta_0) + \lambda\,s + \tfrac12\lambda^2 q`
    of a curve, per task.

    Attributes:
        loss0: ``{task: ℓ(θ0)}``.
        slope: ``{task: s = gᵀτ}``, the first-order term measured at θ0.
        curvature: ``{task: q = τᵀCτ}``.
        kind: C: ``"fisher"`` (exact along τ; the generalised Gauss–Newton for other criteria),
            ``"hessian"`` or ``"diagonal"`` (a diagonal Fisher).
        label: Name of the direction.
    """

    loss0: dict[int, float]
    slope: dict[int, float]
    curvature: dict[int, float]
    kind: str = "fisher"
    label: str = "τ"

    def predict(self, lambdas: Sequence[float], tasks: Sequence[int] | None = None) -> list[float]:
        """The mean over ``tasks`` (default all) of the predicted loss at each λ."""
        lams = [float(v) for v in lambdas]
        per_task = {
            t: [self.loss0[t] + lam * self.slope[t] + 0.5 * lam**2 * self.curvature[t] for lam in lams]
            for t in self.loss0
        }
        return _mean_over(per_task, tasks)

    def plot(self, ax=None, lambdas: Sequence[float] = DEFAULT_LAMBDAS, *, tasks: Sequence[int] | None = None,
             **kwargs):  # fmt: skip
        """The predicted curve (dashed by default); returns ``ax``."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        kwargs.setdefault("ls", "--")
        kwargs.setdefault("label", f"{self.label}: second order ({self.kind})")
        ax.plot(list(lambdas), self.predict(lambdas, tasks), **kwargs)
        return ax

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {"kind": "second_order", **asdict(self), "curvature_kind": self.kind}

    @classmethod
    def from_json(cls, data: Mapping) -> SecondOrder:
        """Read :meth:`to_json`'s output."""
        return cls(_int_keys(data["loss0"]), _int_keys(data["slope"]), _int_keys(data["curvature"]),
                   data.get("curvature_kind", "fisher"), data.get("label", "τ"))  # fmt: skip


def second_order(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    data: ProbeData,
    head: nn.Module,
    *,
    curvature: str | DiagonalFisher = "fisher",
    label: str = "τ",
    criterion: Criterion = cross_entropy,
    batch_size: int = 256,
    progress: bool | None = True,
) -> SecondOrder:
    r"""Predict the curve :math:`\ell(\theta_0 + \lambda\tau)` of each task from θ0 (spec §A.2.1, Eq. 2).

    With :math:`\phi(\lambda) = \ell(\theta_0+\lambda\tau)`, the prediction is
    :math:`\phi(0) + \lambda\phi'(0) + \tfrac12\lambda^2 q`; :math:`\phi'(0) = g^\top\tau` is
    measured exactly (one forward-mode pass gives the outputs' derivative :math:`J\tau`), and q is

    * ``"fisher"``: :math:`\tau^\top F\tau = \frac1N\sum_n (J_n\tau)^\top \nabla^2_z\ell_n\,(J_n\tau)`,
      the Fisher along τ, exact (no diagonal): for cross-entropy the generalised Gauss–Newton
      matrix *is* the true Fisher (spec §A.2.4);
    * ``"hessian"``: :math:`\tau^\top H\tau = \phi''(0)` (forward-over-reverse through the model);
    * a :class:`~compolab.fisher_store.DiagonalFisher`: :math:`\sum_i \bar F_i\tau_i^2`, the
      paper's proxy (the same q for every task).

    Returns:
        A :class:`SecondOrder` per task of ``data``.

    Raises:
        ConfigError: An unknown curvature, or τ not matching θ0 / the Fisher.
    """
    names = _check_directions(theta0, [tau])
    if not isinstance(curvature, DiagonalFisher) and curvature not in ("fisher", "hessian"):
        raise ConfigError(f"curvature must be 'fisher', 'hessian' or a DiagonalFisher, got {curvature!r}")
    kind = "diagonal" if isinstance(curvature, DiagonalFisher) else curvature
    diagonal_q = float(curvature.quadratic(tau)) if isinstance(curvature, DiagonalFisher) else None
    like = theta0[names[0]]
    loss0, slope, quad = {}, {}, {}
    was_training = backbone.training
    backbone.eval()
    with math_attention(backbone):
        for t in tqdm(data.tasks, desc=f"second order {label}", disable=not progress, leave=False):
            sums = torch.zeros(3, dtype=torch.float64)
            for x, y in _batches(data.x[t], data.y[t], batch_size):
                x, y = x.to(like.device), y.to(like.device)
                z0, v = _output_jvp(backbone, head, theta0, names, tau, x)
                z0, v = z0.detach(), v.detach()
                value, first, second = _scalar_derivatives(lambda s: criterion(z0 + s * v, y).sum(), like)  # noqa: B023
                if kind == "hessian":

                    def phi(s: Tensor) -> Tensor:
                        params = {n: theta0[n] + s * tau[n].to(like) for n in names}
                        return criterion(head(functional_call(backbone, params, (x,))), y).sum()  # noqa: B023

                    second = _scalar_derivatives(phi, like)[2]
                sums += torch.stack([value, first, second]).double().cpu()
            n = len(data.y[t])
            loss0[t], slope[t] = float(sums[0] / n), float(sums[1] / n)
            quad[t] = diagonal_q if diagonal_q is not None else float(sums[2] / n)
    backbone.train(was_training)
    return SecondOrder(loss0, slope, quad, kind, label)


# --------------------------------------------------------------------------- Jensen gap


@dataclass
class JensenGap:
    r"""The composition gap as the number of composed modules K grows (spec §A.2.2–§A.2.3).

    For the first K modules with :math:`w_t = 1/K` and :math:`\bar\tau_K = \frac1K\sum_{t<K}\tau_t`:
    measured :math:`\frac1K\sum_{t<K}\ell(\theta_0+\tau_t) - \ell(\theta_0+\bar\tau_K)` against
    :math:`\Omega_K = \frac{1}{2K}\sum_{t<K}(\tau_t-\bar\tau_K)^\top C\,(\tau_t-\bar\tau_K)`.

    Attributes:
        sizes: The K values.
        modules: The module ids, in composition order.
        mean_individual: Mean loss of the K individual models.
        composed: Loss of the composed model.
        measured: ``mean_individual − composed``.
        omega: Ω with C the Fisher at θ0, exact along the modules (no diagonal).
        omega_diagonal: Ω with a diagonal Fisher, when one was given.
    """

    sizes: list[int]
    modules: list[int]
    mean_individual: list[float]
    composed: list[float]
    measured: list[float]
    omega: list[float]
    omega_diagonal: list[float] | None = None

    def plot(self, ax=None):
        """Measured gap and the Ω estimates against K; returns ``ax``.

        The diagonal-Fisher Ω, orders of magnitude smaller, gets its own axis on the right.
        """
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        handles = ax.plot(
            self.sizes, self.measured, "o-", color="C0", label="measured: mean individual − composed"
        )
        handles += ax.plot(self.sizes, self.omega, "s--", color="C1", label="Ω, Fisher at θ0")
        if self.omega_diagonal is not None:
            right = ax.twinx()
            handles += right.plot(self.sizes, self.omega_diagonal, "^:", color="C2",
                                  label="Ω, diagonal Fisher (right axis)")  # fmt: skip
            right.set_ylabel("Ω, diagonal Fisher", color="C2")
            right.set_ylim(bottom=0)
            right.grid(False)
        ax.set_ylim(bottom=min(0.0, *self.measured))
        ax.set(xlabel="modules composed K", ylabel="loss gap", xticks=self.sizes)
        ax.legend(handles=handles, fontsize=8, loc="lower right")
        return ax

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {"kind": "jensen", **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping) -> JensenGap:
        """Read :meth:`to_json`'s output."""
        keys = ("sizes", "modules", "mean_individual", "composed", "measured", "omega", "omega_diagonal")
        return cls(**{k: data.get(k) for k in keys})


def jensen_gap(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    taus: Mapping[int, Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]],
    data: ProbeData,
    head: nn.Module,
    *,
    sizes: Sequence[int] | None = None,
    fisher: DiagonalFisher | None = None,
    criterion: Criterion = cross_entropy,
    chunk: int | None = None,
    batch_size: int = 256,
    progress: bool | None = True,
) -> JensenGap:
    r"""Measured composition gap vs the curvature estimate Ω, composing the first K modules.

    One loss throughout: the mean over the tasks of ``data`` (the theory's single ℓ). The
    individual and composed losses come from one :func:`evaluate_points` call; Ω from one
    forward-mode pass per module: :math:`J(\tau_t-\bar\tau) = J\tau_t - J\bar\tau`, so every K
    reuses the same :math:`J\tau_t`.

    Args:
        taus: The modules (by id, in id order, or a list).
        sizes: The K values (default 1..T).
        fisher: A diagonal Fisher for the paper's proxy Ω (optional).

    Raises:
        ConfigError: Fewer than one module, or sizes outside 1..T.
    """
    mods = dict(taus) if isinstance(taus, Mapping) else dict(enumerate(taus))
    ids = sorted(mods)
    names = _check_directions(theta0, [mods[i] for i in ids])
    sizes = list(range(1, len(ids) + 1)) if sizes is None else [int(k) for k in sizes]
    if not sizes or any(not 1 <= k <= len(ids) for k in sizes):
        raise ConfigError(f"sizes must lie in 1..{len(ids)}, got {sizes}")
    directions = [mods[i] for i in ids]
    eye = torch.eye(len(ids)).tolist()
    composed_rows = [[1.0 / k if j < k else 0.0 for j in range(len(ids))] for k in sizes]
    loss, _ = evaluate_points(backbone, theta0, directions, eye + composed_rows, data, head,
                              criterion=criterion, chunk=chunk, batch_size=batch_size,
                              progress=progress, desc="jensen")  # fmt: skip
    task_mean = loss.mean(1)  # the multi-task loss ℓ at each point
    individual, composed = task_mean[: len(ids)], task_mean[len(ids) :]
    like = theta0[names[0]]
    # Ω_K from J τ_t on every probe batch: ½ (1/K) Σ_t (v_t − v̄)ᵀ ∇²_z ℓ (v_t − v̄), per task, then averaged.
    omega = torch.zeros(len(sizes), dtype=torch.float64)
    was_training = backbone.training
    backbone.eval()
    with math_attention(backbone):
        for t in tqdm(data.tasks, desc="jensen Ω", disable=not progress, leave=False):
            per_task = torch.zeros(len(sizes), dtype=torch.float64)
            for x, y in _batches(data.x[t], data.y[t], batch_size):
                x, y = x.to(like.device), y.to(like.device)
                outs = [_output_jvp(backbone, head, theta0, names, mods[i], x) for i in ids]
                z0, vs = outs[0][0].detach(), torch.stack([o[1].detach() for o in outs])
                for q, k in enumerate(sizes):
                    bar = vs[:k].mean(0)
                    for j in range(k):
                        u = vs[j] - bar
                        second = _scalar_derivatives(lambda s: criterion(z0 + s * u, y).sum(), like)[2]  # noqa: B023
                        per_task[q] += float(second) / (2 * k)
            omega += per_task / len(data.y[t])
    backbone.train(was_training)
    omega /= len(data.tasks)
    omega_diag = None
    if fisher is not None:
        omega_diag = []
        for k in sizes:
            bar = sum(TaskVector(dict(mods[i])) for i in ids[:k]) / k
            omega_diag.append(
                sum(float(fisher.quadratic(TaskVector(dict(mods[i])) - bar)) for i in ids[:k]) / (2 * k)
            )
    mean_ind = [float(individual[:k].mean()) for k in sizes]
    comp = composed.tolist()
    return JensenGap(sizes, ids, mean_ind, comp, [m - c for m, c in zip(mean_ind, comp, strict=True)],
                     omega.tolist(), omega_diag)  # fmt: skip


# --------------------------------------------------------------------------- from a pool


@dataclass
class PoolProbe:
    """What a probe needs from a pool: θ0, the modules as task vectors, a head over every pool
    task's classes (class-incremental) and fixed probe images of every task.

    Attributes:
        backbone: θ0's model (eval mode).
        theta0: θ0's tuned weights.
        taus: ``{task: τ_t}``.
        head: The pool's task heads, concatenated.
        data: The probe images.
        fisher: The pool's saved diagonal Fishers summed over tasks, when the run kept them.
    """

    backbone: nn.Module
    theta0: dict[str, Tensor]
    taus: dict[int, TaskVector]
    head: nn.Module
    data: ProbeData
    fisher: DiagonalFisher | None = None


def open_pool_probe(
    pool, *, split: str = "train", per_task: int = 50, seed: int = 0, bench=None
) -> PoolProbe:
    """Load a pool (folder or :class:`~compolab.pool.Pool`) for probing.

    Args:
        pool: The pool.
        split, per_task, seed: The probe images (:meth:`ProbeData.from_benchmark`).
        bench: The benchmark, when the caller has it already (default: rebuilt from the manifest).

    Raises:
        ConfigError: An empty pool, or a TMC pool (its components live in the linearised model:
            probe them with :mod:`compolab.linearize`).
    """
    from compolab.heads import IncrementalHead
    from compolab.incremental import saved_fisher
    from compolab.pool import Pool
    from compolab.run import open_pool_world

    pool = pool if isinstance(pool, Pool) else Pool.open(pool)
    if not pool.tasks():
        raise ConfigError(f"{pool.root} holds no module yet")
    if pool.manifest.get("method") == "tmc":
        raise ConfigError(f"{pool.root} is a TMC pool: its components are tangents of the linearised model, "
                          "not weights of θ0's model; the basin probes do not apply")  # fmt: skip
    backbone, theta0, loaded = open_pool_world(pool, load_data=bench is None)
    bench = bench if bench is not None else loaded
    entries = pool.load_all(theta0_sha256=pool.manifest["theta0_sha256"])
    ids = sorted(entries)
    head = IncrementalHead(
        [entries[t].head for t in ids], tasks=ids, classes=[entries[t].classes for t in ids]
    )
    head = head.requires_grad_(False).eval()
    taus = {t: entries[t].module.delta(theta0).detach() for t in ids}
    names = list(taus[ids[0]])
    data = ProbeData.from_benchmark(bench, head.global_labels.tolist(), ids, split=split, per_task=per_task,
                                    seed=seed)  # fmt: skip
    fisher = saved_fisher(Path(pool.root).parent / "state")
    return PoolProbe(backbone, {n: theta0[n] for n in names}, taus, head, data, fisher)
