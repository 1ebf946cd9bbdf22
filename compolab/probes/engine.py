r"""The probe engine: fixed probe images, one multi-task loss, evaluated at many points at once.

Every probe measures the mean over tasks of each task's mean loss on fixed probe images
(:class:`ProbeData`), with one fixed head, at points of a low-dimensional subspace through θ0:

.. math:: \theta = \theta_0 + \textstyle\sum_j c_j\, d_j ,

spanned by directions :math:`d_j` (modules τ_t, their average, random directions).
:func:`evaluate_points` stacks a chunk of points and runs them with one :func:`torch.func.vmap` of
the model on a GPU; on the CPU, where the batched math attention loses to the fused kernel on
batches of a few hundred images, it runs one point at a time. A curve costs points × images
forwards: on 2 CPU cores ≈ 1,200 point-images per second for the tiny ViT, so a 41-point curve on
50 images of each of 5 tasks takes ≈ 8 s (``compolab bench probe``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from compolab.curvature import math_attention
from compolab.distributed import all_gather_rows, current_world, owner_of
from compolab.errors import ConfigError

__all__ = ["Criterion", "cross_entropy", "ProbeData", "evaluate_points"]

#: ``(outputs, targets) -> per-sample losses``.
Criterion = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy (the default criterion of every probe)."""
    return F.cross_entropy(outputs, targets, reduction="none")


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


def check_directions(theta0: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """The common parameter names of ``directions``, checked against each other and θ0.

    Raises:
        ConfigError: No direction, or keys / shapes that differ (the keys are named).
    """
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


def batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive ``(x, y)`` slices of at most ``batch_size`` samples."""
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
    probe``), and 8 on a GPU. Under ``torchrun`` the chunks are split round-robin over the ranks and
    the rows all-gathered, so every rank returns the whole result.

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

    Examples:
        >>> net = nn.Linear(2, 2, bias=False)
        >>> data = ProbeData({0: torch.eye(2)}, {0: torch.tensor([0, 1])})
        >>> loss, acc = evaluate_points(net, {"weight": torch.zeros(2, 2)}, [{"weight": torch.eye(2)}],
        ...                             [[0.0]], data, nn.Identity(), progress=False)
        >>> round(loss.item(), 4) == round(math.log(2), 4), tuple(acc.shape)  # uniform outputs at θ0
        (True, (1, 1))
    """
    names = check_directions(theta0, directions)
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
    world = current_world()  # under torchrun every rank evaluates its share of the chunks
    starts = [s for k, s in enumerate(range(0, len(coefs), chunk)) if owner_of(k, world) == world.rank]
    with math_attention(backbone) if chunk > 1 else contextlib.nullcontext():
        for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
            c = coefs[s : s + chunk]
            params = {n: theta0[n].to(like) + torch.tensordot(c, stacked[n], dims=1) for n in names}
            for k, t in enumerate(tasks):
                total, correct = (
                    torch.zeros(len(c), dtype=torch.float64),
                    torch.zeros(len(c), dtype=torch.float64),
                )
                for x, y in batches(data.x[t], data.y[t], batch_size):
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
    if world.active:
        owners = [owner_of(p // chunk, world) for p in range(len(coefs))]
        loss, acc = all_gather_rows(loss, owners), all_gather_rows(acc, owners)
    return loss, acc


def per_task(values: Tensor, tasks: Sequence[int]) -> dict[int, list[float]]:
    """``{task: column}`` of a ``(P, T)`` result of :func:`evaluate_points`."""
    return {t: values[:, k].tolist() for k, t in enumerate(tasks)}


def mean_over(values: Mapping[int, Sequence[float]], tasks: Sequence[int] | None) -> list[float]:
    """The mean over ``tasks`` (default: all) of per-task curves ``{task: values}``.

    Raises:
        ConfigError: A task that was not probed, or no task.
    """
    tasks = list(values) if tasks is None else list(tasks)
    missing = [t for t in tasks if t not in values]
    if missing:
        raise ConfigError(f"task(s) {missing} were not probed; probed: {sorted(values)}")
    if not tasks:
        raise ConfigError("no task to average over")
    rows = torch.tensor([list(values[t]) for t in tasks], dtype=torch.float64)
    return rows.mean(0).tolist()


def int_keys(d: Mapping) -> dict:
    """``d`` with integer keys (JSON turns task ids into strings)."""
    return {int(k): v for k, v in d.items()}
