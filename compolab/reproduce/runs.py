"""The job functions of ``compolab reproduce``, as worker processes call them: train a run, measure
the edits of its pool, merge its pool every way (:mod:`compolab.merging`), probe its composition
gap per curvature, execute a notebook (:mod:`compolab.reproduce.notebooks`).

A worker receives ``(kind, args)`` and calls :func:`execute`; every function here is importable by
name, so ``spawn`` workers find them.
"""

from __future__ import annotations

import time
from pathlib import Path

from compolab.io import file_sha256, read_json, write_json
from compolab.measure import measure_edits
from compolab.reproduce.notebooks import job_notebook
from compolab.run import RunConfig, run

__all__ = ["init_worker", "job_run", "job_edits", "job_merges", "job_curvature", "execute"]

#: Training images per task behind each Fisher of Fisher merging (the exact Fisher costs one
#: backward per class: ≈ 5 s per task of ``tiny10`` on one thread at 100 images).
MERGE_FISHER_IMAGES = 100


def init_worker() -> None:
    """A worker process: one thread (the jobs run side by side on the cores)."""
    import torch

    torch.set_num_threads(1)


def job_run(config: dict, out: str, device: str = "cpu", benchmark=None, backbone=None) -> float:
    """Train (or resume, or reuse) one run; returns its final accuracy."""
    from compolab.runtime import Runtime

    path = Path(out)
    if (path / "results.json").exists():
        done = read_json(path / "results.json")
        if done.get("final_accuracy") is not None:
            return done["final_accuracy"]
    resume = (path / "config.json").exists()
    results = run(RunConfig.from_json(config), path, resume=resume, progress=False, benchmark=benchmark,
                  backbone=backbone, runtime=Runtime.resolve(device, None))  # fmt: skip
    return results["final_accuracy"]


def job_edits(run_dir: str, path: str, negate_coef: float = 1.0, device: str = "cpu", benchmark=None,
              backbone=None) -> None:  # fmt: skip
    """Measure and cache the edits of one run's pool (tagged with the sha256 of its results)."""
    edits = measure_edits(run_dir, negate_coef=negate_coef, device=str(device), backbone=backbone,
                          bench=benchmark)  # fmt: skip
    edits["results_sha256"] = file_sha256(Path(run_dir) / "results.json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, edits)


def job_merges(run_dir: str, path: str, fisher_images: int = MERGE_FISHER_IMAGES, benchmark=None,
               backbone=None) -> None:  # fmt: skip
    """Every merge of one run's pool (:func:`compolab.merge_pool.merge_pool`, the second-order view
    included) and the pool's own composition, cached as JSON (tagged like :func:`job_edits`)."""
    from compolab.merge_pool import DEFAULT_MERGES, GRIDS, MergeContext, merge_pool
    from compolab.pool_stats import DEFAULT_KINDS, has_pool_statistics, save_pool_statistics

    pool = Path(run_dir) / "pool"
    ctx = MergeContext.of(pool, bench=benchmark, backbone=backbone)
    kinds = [k for k in DEFAULT_KINDS if not has_pool_statistics(pool, k, ctx.opened.tasks)]
    if kinds:
        save_pool_statistics(ctx.opened, kinds, fisher_images=fisher_images)
    reference = merge_pool(pool, "task-arithmetic", grid=[{}], context=ctx)  # w_t = 1/T: the composition
    results = [{**reference, "reference": True}]
    results += [merge_pool(pool, name, context=ctx) for name in DEFAULT_MERGES]  # not the opt-in K-FAC
    grids = {name: GRIDS[name] for name in DEFAULT_MERGES}
    out = {"results_sha256": file_sha256(Path(run_dir) / "results.json"), "grids": grids, "merges": results}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)


def job_curvature(run_dir: str, path: str, per_task: int, mc_samples: int, benchmark=None,
                  backbone=None) -> None:  # fmt: skip
    """The composition gap of one run's pool against Ω per curvature (:func:`compolab.probes.jensen_gap`
    with the K-FAC and the diagonal of :func:`compolab.probes.probe_curvature`, Monte-Carlo), cached
    as JSON (tagged like :func:`job_edits`, with its settings)."""
    from compolab.probes import jensen_gap, open_pool_probe, probe_curvature

    pp = open_pool_probe(Path(run_dir) / "pool", per_task=per_task, bench=benchmark, backbone=backbone)
    fisher, kfac = (probe_curvature(kind, pp.backbone, pp.theta0, pp.head, pp.data, fisher_type="mc",
                                    mc_samples=mc_samples) for kind in ("diagonal", "kfac"))  # fmt: skip
    gap = jensen_gap(pp.backbone, pp.theta0, pp.taus, pp.data, pp.head, fisher=fisher, kfac=kfac,
                     progress=False)  # fmt: skip
    out = {"results_sha256": file_sha256(Path(run_dir) / "results.json"),
           "settings": {"per_task": per_task, "mc_samples": mc_samples}, "jensen": gap.to_json()}  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)


#: ``kind -> job function`` of each :class:`~compolab.reproduce.plan.Job`.
_FUNCTIONS = {"run": job_run, "edits": job_edits, "merges": job_merges, "curvature": job_curvature,
              "notebook": job_notebook}  # fmt: skip


def execute(kind: str, args: dict) -> float:
    """Run one job; returns the CPU seconds it used, its subprocesses' (a notebook's kernel) included."""
    import resource

    def cpu() -> float:
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + c.ru_utime + c.ru_stime

    start = cpu()
    _FUNCTIONS[kind](**args)
    return cpu() - start
