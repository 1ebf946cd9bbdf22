r"""``compolab merge``: one merge of a pool's modules, its coefficients chosen on the validation split.

A merge (:mod:`compolab.merging`) maps the pool's dense task vectors :math:`\tau_t` (LoRA and
(IA)³ modules are densified by :meth:`~compolab.tuning.TaskModule.delta`) to one :math:`\tau`;
the merged model is :math:`\theta_0 + \tau` with every task's head (class-incremental, one argmax
over all classes). Each merge's hyper-parameters — the scale :math:`\lambda`, TIES' density,
DARE's drop rate, RegMean's :math:`\alpha`, K-FAC merging's damping — are chosen from :data:`GRIDS`
by the final average accuracy on the **validation** split, as each paper prescribes; the test
split is measured once, at the choice.

The merged model is written as a pool like any other (``compolab compose``, the probes and the
explorer open it): one full-fine-tuning module per task, each holding the same :math:`\tau`, with
the task's own head; its uniform composition :math:`\theta_0 + \sum_t \tfrac1T \tau` is the
merged model. The manifest names no training method and records the merge under ``merge``.

>>> summary = merge_pool("runs/ita/pool", "ties", "runs/ita-ties")    # doctest: +SKIP
>>> summary["chosen"], summary["test_accuracy"]                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from compolab.compose import merge as merged_model
from compolab.data import Benchmark
from compolab.errors import ConfigError
from compolab.evaluate import evaluate_tasks, final_average
from compolab.heads import IncrementalHead
from compolab.io import write_json
from compolab.merging import MERGES
from compolab.pool import Pool, PoolEntry
from compolab.pool_stats import DEFAULT_KINDS, load_pool_kfacs, load_pool_statistics
from compolab.probes.engine import ProbeData, evaluate_points
from compolab.probes.taylor import second_order
from compolab.stem import cache_stem
from compolab.task_vector import TaskVector
from compolab.tuning import FullModule
from compolab.workspace import OpenedPool, open_pool, require_weights

__all__ = [
    "DEFAULT_MERGES", "GRIDS", "STATISTICS", "MergeContext", "check_merge", "merge_lens", "merge_pool",
    "merged_tau", "own_predictions", "pool_statistics", "pool_taus", "task_predictions",
]  # fmt: skip

_SCALES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
#: The hyper-parameters tried for each merge (the first of equal validation scores wins).
GRIDS: dict[str, list[dict]] = {
    "task-arithmetic": [{"scale": s} for s in _SCALES],
    "ties": [{"density": 0.2, "scale": s} for s in (0.3, 0.5, 0.8, 1.0, 1.3, 1.6)],
    "dare": [{"p": p, "scale": s, "seed": 0} for p in (0.5, 0.9) for s in _SCALES],
    "dare-ties": [
        {"p": p, "density": 0.2, "scale": s, "seed": 0} for p in (0.5, 0.9) for s in (0.5, 1.0, 1.5)
    ],
    "fisher": [{}],
    "regmean": [{"alpha": a} for a in (0.5, 0.9, 1.0)],
    "kfac": [{"damping": d} for d in (1e-2, 1e-1, 1.0)],
    "tsv": [{"scale": s} for s in (0.5, 0.8, 1.0, 1.3)],
    "iso-c": [{"scale": s} for s in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)],
    "magmax": [{"scale": s} for s in (0.3, 0.5, 0.7, 1.0)],
}
#: The pool statistic behind each merge keyword (:mod:`compolab.pool_stats`).
STATISTICS: dict[str, str] = {"fishers": "fisher", "grams": "grams", "kfacs": "kfac"}
#: The merges whose statistics ``compolab stats`` makes by default (``pool_stats.DEFAULT_KINDS``): those
#: ``compolab reproduce`` and notebook 08 run (K-FAC merging is opt-in, as its statistics are).
DEFAULT_MERGES: tuple[str, ...] = tuple(
    n for n, m in MERGES.items() if all(STATISTICS[k] in DEFAULT_KINDS for k in m.needs)
)


def check_merge(pool: Pool, method: str, out: str | Path | None = None) -> None:
    """Everything about a merge request that can be checked before any weights load: one line each.

    Raises:
        ConfigError: An unknown merge (the known ones listed), a TMC pool, an ``out`` that already
            holds files, or missing / stale statistics (the message says how to make them).
    """
    if method not in MERGES:
        raise ConfigError(f"--method {method!r} is not a merge; known merges: {', '.join(MERGES)}")
    require_weights(pool, "merge a pool of weights")
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise ConfigError(f"--out {out} already holds files; choose a new folder")
    for keyword in sorted(MERGES[method].needs):
        pool_statistics(pool, keyword, pool.tasks())  # missing or stale: raises


def pool_statistics(pool: Pool, keyword: str, tasks: Sequence[int]) -> list:
    """The per-task statistics of a merge keyword (:data:`STATISTICS`): KFACs for ``kfacs``, else tensors."""
    kind = STATISTICS[keyword]
    return load_pool_kfacs(pool, tasks) if kind == "kfac" else load_pool_statistics(pool, kind, tasks)


def pool_taus(opened: OpenedPool) -> list[dict[str, Tensor]]:
    """The dense task vectors :math:`\\tau_t` of an opened pool, in task order."""
    return [dict(opened.entries[t].module.delta(opened.theta0).detach()) for t in sorted(opened.entries)]


def merged_tau(
    method: str, taus: Sequence[Mapping[str, Tensor]], statistics: Mapping[str, list], hparams: Mapping
) -> dict[str, Tensor]:
    """One merge of ``taus`` with ``hparams`` and the statistics it needs (``keyword -> per-task list``)."""
    kwargs = {k: statistics[k] for k in MERGES[method].needs}
    return MERGES[method](taus, **kwargs, **hparams)


def _head(opened: OpenedPool) -> IncrementalHead:
    ids = sorted(opened.entries)
    return IncrementalHead(
        [opened.entries[t].head for t in ids], tasks=ids, classes=[opened.entries[t].classes for t in ids]
    ).eval()


def _accuracy(
    opened: OpenedPool, bench, head: IncrementalHead, tau: Mapping[str, Tensor], split: str
) -> float:
    model = _model(opened, tau)
    with torch.no_grad(), opened.runtime.autocast_context():
        acc = evaluate_tasks(model, head, bench, sorted(opened.entries), split=split, device=opened.device)
    return final_average(acc)


@dataclass
class MergeContext:
    """What every merge of one pool reads: the opened pool, its dense τ's, the benchmark with θ0's stem
    tokens computed once, every head, and (lazily) each task's predictions under its own module."""

    opened: OpenedPool
    taus: list[dict[str, Tensor]]
    bench: Benchmark
    head: IncrementalHead
    own: dict[int, Tensor] | None = None

    @classmethod
    def of(cls, pool: str | Path | Pool, *, bench: Benchmark | None = None,
           backbone: nn.Module | None = None) -> MergeContext:  # fmt: skip
        """Open ``pool`` (its θ0, benchmark and modules; ``bench`` / ``backbone`` as in :func:`open_pool`)."""
        opened = open_pool(pool, bench=bench, backbone=backbone)
        taus = pool_taus(opened)
        bench = cache_stem(opened.bench, opened.backbone, sorted(taus[0]))  # the stem once per image
        return cls(opened, taus, bench, _head(opened))

    def own_predictions(self) -> dict[int, Tensor]:
        if self.own is None:
            self.own = own_predictions(self.opened, self.taus, self.bench)
        return self.own


def merge_pool(
    pool: str | Path | Pool,
    method: str,
    out: str | Path | None = None,
    *,
    grid: Sequence[Mapping] | None = None,
    evaluate: bool = True,
    lens: bool = True,
    context: MergeContext | None = None,
    progress: bool | None = False,
) -> dict:
    """Merge a pool with ``method``, choose its hyper-parameters on validation, write the merged pool.

    Args:
        pool: A run's ``pool/`` (ITA, IEL, naive, ... — not TMC).
        method: A key of :data:`compolab.merging.MERGES`.
        out: Folder of the merged pool (new or empty); None writes nothing.
        grid: Hyper-parameters to try (default :data:`GRIDS` ``[method]``); one entry: no choice.
        evaluate: Also measure the test split at the choice.
        lens: Also the second-order view of the choice (:func:`merge_lens`, test split).
        context: :meth:`MergeContext.of` the same pool, to share between merges (default: opened here).
        progress: Show a progress bar over the grid.

    Returns:
        ``{"merge", "pool", "grid": [{"hparams", "val_accuracy"}], "chosen", "test_accuracy"}``
        and, with ``lens``, ``"lens"`` (:func:`merge_lens`); also ``<out>/merge.json``.

    Raises:
        ConfigError: Before any weights load, see :func:`check_merge`; a grid of several entries on
            a benchmark without a validation split.
    """
    pool = pool if isinstance(pool, Pool) else Pool.open(pool)
    check_merge(pool, method, out)
    grid = list(GRIDS[method] if grid is None else grid)
    if not grid:
        raise ConfigError("grid is empty: give at least one set of hyper-parameters")
    ctx = context if context is not None else MergeContext.of(pool)
    opened, taus, bench, head = ctx.opened, ctx.taus, ctx.bench, ctx.head
    ids = sorted(opened.entries)
    if len(grid) > 1 and not all(len(bench.tasks[t].val) for t in ids):
        raise ConfigError(
            f"{pool.root}: the benchmark has no validation split to choose the {method} "
            "hyper-parameters on; give one set (grid=[{...}])"
        )
    statistics = {k: pool_statistics(pool, k, ids) for k in MERGES[method].needs}
    scores, best, tau = [], 0, {}
    for i, hparams in enumerate(tqdm(grid, desc=f"merge {method}", disable=not progress)):
        candidate = merged_tau(method, taus, statistics, hparams)
        val = _accuracy(opened, bench, head, candidate, "val") if len(grid) > 1 else None
        scores.append({"hparams": dict(hparams), "val_accuracy": None if val is None else round(val, 2)})
        if i == 0 or (scores[i]["val_accuracy"] or 0.0) > (scores[best]["val_accuracy"] or 0.0):
            best, tau = i, candidate  # the first of equal scores; kept, not merged again
    chosen = dict(grid[best])
    summary = {
        "merge": method,
        "pool": str(pool.root),
        "grid": scores,
        "chosen": chosen,
        "test_accuracy": round(_accuracy(opened, bench, head, tau, "test"), 2) if evaluate else None,
    }
    if lens:
        summary["lens"] = merge_lens(opened, tau, head, ctx.own_predictions(), bench)
    if out is not None:
        _write_pool(opened, tau, summary, Path(out))
    return summary


def _one_task(model: nn.Module, opened: OpenedPool, bench, t: int) -> Tensor:
    """Task ``t``'s predicted local classes under ``model`` on its test split, with its own head."""
    h = opened.entries[t].head
    with torch.no_grad():
        return torch.cat([h(model(x.to(opened.device))).argmax(1).cpu()
                          for x, _ in DataLoader(bench.tasks[t].test, batch_size=256)])  # fmt: skip


def task_predictions(model: nn.Module, opened: OpenedPool, bench) -> dict[int, Tensor]:
    """``task -> predicted local classes`` of one model on every task's test split, each with its own
    head (task identity given, as merging papers evaluate)."""
    return {t: _one_task(model, opened, bench, t) for t in sorted(opened.entries)}


def own_predictions(opened: OpenedPool, taus: Sequence[Mapping[str, Tensor]], bench) -> dict[int, Tensor]:
    """Each task's predictions under its own module alone, θ0 + τ_t (the fine-tuned model of task t)."""
    ids = sorted(opened.entries)
    return {t: _one_task(_model(opened, tau_t), opened, bench, t) for t, tau_t in zip(ids, taus, strict=True)}


def _model(opened: OpenedPool, tau: Mapping[str, Tensor]) -> nn.Module:
    """θ0 + τ as one ordinary model, in eval mode."""
    return merged_model(opened.backbone, opened.theta0, [TaskVector(dict(tau))], [1.0]).eval()


def _labels(opened: OpenedPool, bench, t: int) -> Tensor:
    local = {c: i for i, c in enumerate(opened.entries[t].classes)}
    loader = DataLoader(bench.tasks[t].test, batch_size=4096)
    return torch.tensor([local[int(y)] for _, ys in loader for y in ys])


def merge_lens(
    opened: OpenedPool,
    tau: Mapping[str, Tensor],
    head: IncrementalHead,
    own: Mapping[int, Tensor],
    bench,
    *,
    split: str = "test",
    per_task: int = 50,
) -> dict:
    r"""The merge of :math:`\tau` seen from θ0 and from the single-task models.

    On ``per_task`` images of each task's ``split`` (class-incremental, every head):

    * ``measured_loss``: the cross-entropy of :math:`\theta_0 + \tau`, mean over tasks;
    * ``predicted_loss``: its second-order expansion around θ0 (Eq. 2 at λ = 1),
      :math:`\ell(\theta_0) + g^\top\tau + \tfrac12\tau^\top F\tau`, the Fisher exact along τ
      (:func:`compolab.probes.taylor.second_order`).

    On each task's test split with its own head (``own``: :func:`own_predictions`):

    * ``normalized_accuracy``: :math:`\frac1T\sum_t \mathrm{acc}_t(\theta_0+\tau) /
      \mathrm{acc}_t(\theta_0+\tau_t)`, the merge against the fine-tuned model of each task;
    * ``disentanglement_error``: Ortiz-Jiménez et al.'s weight disentanglement error,
      :math:`\xi = \frac1T\sum_t \Pr_{x\in D_t}[\hat y_t(x;\theta_0+\tau_t) \ne \hat y_t(x;\theta_0+\tau)]`.
    """
    ids = sorted(opened.entries)
    columns = head.global_labels.tolist()
    data = ProbeData.from_benchmark(opened.bench, columns, ids, split=split, per_task=per_task)
    theta0 = {n: opened.theta0[n] for n in tau}
    loss, _ = evaluate_points(opened.backbone, theta0, [tau], [[1.0]], data, head, progress=False)
    predicted = second_order(opened.backbone, theta0, tau, data, head, progress=False).predict([1.0])[0]
    merged = task_predictions(_model(opened, tau), opened, bench)
    ratios, flips = [], []
    for t in ids:
        y = _labels(opened, bench, t)
        own_acc = (own[t] == y).double().mean().item()
        ratios.append((merged[t] == y).double().mean().item() / own_acc if own_acc > 0 else float("nan"))
        flips.append((merged[t] != own[t]).double().mean().item())
    return {
        "split": split,
        "measured_loss": round(float(loss.mean()), 4),
        "predicted_loss": round(predicted, 4),
        "normalized_accuracy": round(sum(ratios) / len(ratios), 4),
        "disentanglement_error": round(sum(flips) / len(flips), 4),
    }


def _write_pool(opened: OpenedPool, tau: Mapping[str, Tensor], summary: dict, out: Path) -> None:
    """The merged pool: per task one full module holding ``tau`` and the task's head; ``merge.json``."""
    manifest = {
        k: v for k, v in opened.pool.manifest.items() if k not in ("compolab_format", "theta0_sha256")
    }
    manifest.update(method=None, merge={k: summary[k] for k in ("merge", "pool", "chosen")})
    merged = Pool.create(out, theta0_sha256=opened.pool.manifest["theta0_sha256"], **manifest)
    names = sorted(tau)
    for t, entry in sorted(opened.entries.items()):
        module = FullModule(names, [tau[n].detach().clone() for n in names])
        card = {
            "classes": entry.classes,
            "method": None,
            "merge": manifest["merge"],
            "hparams": summary["chosen"],
            "metrics": {"test_accuracy": summary["test_accuracy"]},
        }
        merged.save(PoolEntry(t, module, entry.head, card))
    write_json(out / "merge.json", summary)
