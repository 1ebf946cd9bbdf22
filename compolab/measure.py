"""Accuracy of a run's pool under every edit: the numbers behind :mod:`compolab.tables`.

:func:`measure_edits` composes a pool (by its method: merged weights, or TMC's linearised model)
as the full composition, without each τ_k (dropped), with each τ_k negated, and as each single
task and each "all but one" subset, runs each composed model **once** over the test sets and
reads every head it needs off the same outputs. The result is plain JSON, so ``compolab
reproduce`` caches it next to the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from compolab.data import Benchmark, make_loader
from compolab.editing import plan_composition
from compolab.errors import CompolabError
from compolab.evaluate import evaluate_tasks, final_average
from compolab.runfolder import load_results
from compolab.stem import cache_stem
from compolab.tables import RunRecord
from compolab.workspace import open_pool

__all__ = ["read_run", "measure_edits", "composed_accuracy"]


def read_run(out: str | Path, edits: dict | None = None) -> RunRecord:
    """The :class:`~compolab.tables.RunRecord` of a finished run folder (with ``edits`` if given).

    Raises:
        CompolabError: No ``results.json``; ValueError: the run has not finished.
    """
    results = load_results(out)
    cfg = results["config"]
    if results.get("final_accuracy") is None:
        raise ValueError(f"{out}: the run has not finished (no final_accuracy)")
    fa = tuple(sum(row) / len(row) for row in results.get("accuracy_matrix") or [] if row)
    return RunRecord(cfg["method"], cfg["finetune"]["style"], cfg["method_cfg"]["ablation"],
                     cfg["finetune"]["seed"], results["final_accuracy"], edits, str(out), fa,
                     cfg["method_cfg"].get("curvature", "diag"))  # fmt: skip


def _open(run_dir: str | Path, backbone: nn.Module | None, bench: Benchmark | None, device: str):
    """The method, θ0, benchmark and entries of a run's pool (θ0 and data from its manifest by default)."""
    opened = open_pool(Path(run_dir) / "pool", bench=bench, backbone=backbone, runtime=device)
    if opened.method is None:
        raise CompolabError(f"{opened.pool.root} names no method: the editing tables measure a run's pool")
    names = sorted({n for e in opened.entries.values() for n in e.module.names})
    bench = cache_stem(opened.bench, opened.backbone, names)  # every edit reads the same test tokens
    return opened.method, opened.backbone, opened.theta0, bench, opened.entries


def _outputs(model: nn.Module, bench: Benchmark, tasks: Sequence[int], device, batch_size: int = 256) -> dict:
    """``task -> (outputs, labels)`` of ``model`` on each task's test split (one forward per image)."""
    outs = {}
    with torch.no_grad():
        for t in tasks:
            xs, ys = [], []
            for x, y in make_loader(bench.tasks[t].test, batch_size):
                xs.append(model(x.to(device)).cpu())
                ys.append(y)
            outs[t] = (torch.cat(xs), torch.cat(ys))
    return outs


def _accuracy(head: nn.Module, outs: Mapping, tasks: Sequence[int]) -> dict[str, float]:
    """``str(task) -> accuracy (%)`` of ``head`` on the cached outputs (argmax over its classes)."""
    head = head.cpu()
    with torch.no_grad():
        return {str(t): 100.0 * (head.predict(outs[t][0]) == outs[t][1]).float().mean().item() for t in tasks}


def measure_edits(
    run_dir: str | Path,
    *,
    negate_coef: float = 1.0,
    device: str = "cpu",
    backbone: nn.Module | None = None,
    bench: Benchmark | None = None,
) -> dict:
    r"""Test accuracy of every edit of a run's pool (the input of the unlearning and specialization tables).

    Args:
        run_dir: A finished run folder.
        negate_coef: γ of a negated module, relative to the weight :math:`1/(T-1)` of the kept ones:
            :math:`\theta_0 + (\sum_{t\ne k}\tau_t - \gamma\tau_k)/(T-1)`.
        device: Where to evaluate.
        backbone, bench: θ0 and the benchmark (default: from the pool's manifest).

    Returns:
        ``{"tasks", "negate_coef", "before": {t: acc}, "drop": {k: {t: acc}}, "negate": {k: {t: acc}},
        "subsets": {"0,2": {"subset": {t: acc}, "full": {t: acc}}}}`` (keys are strings). ``before``,
        ``drop`` and ``negate`` predict over every task's classes (every head kept); ``subsets``
        over the classes of the subset only, for the subset's composition and for the full one.
    """
    method, backbone, theta0, bench, entries = _open(run_dir, backbone, bench, device)
    tasks = sorted(entries)
    n = len(tasks)

    def composed(**kw):
        model, head = method.compose(backbone, theta0, entries, plan_composition(tasks, **kw))
        return model.eval(), head

    full, every_head = composed()
    full_outs = _outputs(full, bench, tasks, device)
    before = _accuracy(every_head, full_outs, tasks)
    out: dict = {"tasks": tasks, "negate_coef": negate_coef, "before": before, "drop": {}, "negate": {},
                 "subsets": {}}  # fmt: skip
    for k in tasks if n > 1 else []:
        rest = [t for t in tasks if t != k]
        dropped, rest_head = composed(drop=[k])  # = the composition of the subset "all but k"
        drop_outs = _outputs(dropped, bench, tasks, device)
        out["drop"][str(k)] = _accuracy(every_head, drop_outs, tasks)
        negated, _ = composed(tasks=rest, negate=[k], negate_coef=negate_coef / (n - 1))
        out["negate"][str(k)] = _accuracy(every_head, _outputs(negated, bench, tasks, device), tasks)
        out["subsets"][",".join(map(str, rest))] = {
            "subset": _accuracy(rest_head, drop_outs, rest), "full": _accuracy(rest_head, full_outs, rest)}
        if n > 2:  # the single task k (for n = 2 it is an "all but one" already)
            single, head = composed(tasks=[k])
            outs = _outputs(single, bench, [k], device)
            out["subsets"][str(k)] = {"subset": _accuracy(head, outs, [k]),
                                      "full": _accuracy(head, full_outs, [k])}  # fmt: skip
    return out


def composed_accuracy(
    run_dir: str | Path,
    split: str = "val",
    *,
    device: str = "cpu",
    backbone: nn.Module | None = None,
    bench: Benchmark | None = None,
) -> float:
    """FA (%) of a run's full composition on ``split`` (``val``: choosing a schedule without the test set)."""
    method, backbone, theta0, bench, entries = _open(run_dir, backbone, bench, device)
    tasks = sorted(entries)
    model, head = method.compose(backbone, theta0, entries, plan_composition(tasks))
    return final_average(evaluate_tasks(model.eval(), head, bench, tasks, split=split, device=device))
