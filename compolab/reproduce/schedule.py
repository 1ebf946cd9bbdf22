"""The scheduler of ``compolab reproduce``: every job of the plan that the cache does not hold, on a
pool of worker processes, runs first and the longest first; the tables as soon as the runs and
edits are done; the notebooks that read the tables after them."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from compolab.errors import CompolabError, ConfigError
from compolab.io import write_json
from compolab.reproduce.notebooks import record_notebook
from compolab.reproduce.plan import Job, ReproduceConfig, plan
from compolab.reproduce.runs import execute, init_worker
from compolab.tables.write import write_curvature_tables, write_merge_tables, write_run_tables

__all__ = ["reproduce", "write_tables"]


def write_tables(cfg: ReproduceConfig, jobs: Sequence[Job]) -> list[Path]:
    """The tables of the finished runs in ``jobs`` (and of their merges), as markdown + CSV under
    ``<out>/tables``."""
    edits = {j.args["run_dir"]: j.args["path"] for j in jobs
             if j.kind == "edits" and Path(j.args["path"]).exists()}  # fmt: skip
    runs = [(j.args["out"], edits.get(j.args["out"])) for j in jobs if j.kind == "run"]
    data = f"{cfg.benchmark}, " if cfg.benchmark else ""
    made = f"_Made by `{cfg.command()}` ({cfg.preset} preset, {data}{cfg.tasks or 'all'} tasks)._"
    merges = [(j.args["run_dir"], j.args["path"]) for j in jobs if j.kind == "merges"]
    tables = Path(cfg.out) / "tables"
    curvature = [(j.args["run_dir"], j.args["path"]) for j in jobs if j.kind == "curvature"]
    return write_run_tables(runs, tables, methods=cfg.methods, style=cfg.edit_style, made=made) + \
        write_merge_tables(merges, tables, made=made) + \
        write_curvature_tables(curvature, tables, made=made)  # fmt: skip


def _ready(job: Job, done: set[str], tables: bool) -> bool:
    """Whether every job ``job`` waits for is done (``tables``: the tables are written)."""
    return all((a == "tables" and tables) or a in done for a in job.after)


def _priority(job: Job) -> tuple:
    """Runs, then edits and merges, then notebooks; the longest first; by name."""
    order = {"run": 0, "edits": 1, "merges": 1, "curvature": 1, "notebook": 2}
    return (order[job.kind], -(job.cost or 0.0), job.name)


def reproduce(
    cfg: ReproduceConfig,
    *,
    progress: bool | None = True,
    benchmark=None,
    backbone=None,
) -> dict:
    """Run every job of :func:`plan` that the cache does not hold, write the tables, run the notebooks.

    Args:
        cfg: What to make.
        progress: Show the overall progress bar.
        benchmark, backbone: Replace the preset's (tests; only with ``workers=1``).

    Returns:
        ``{"jobs", "done", "cached", "failed": {name: error}, "blocked": [names], "tables": [paths],
        "seconds": wall time, "cpu_seconds": {kind: CPU seconds of its jobs}}``, also written to
        ``<cache>/summary.json``.

    Raises:
        CompolabError: After every job that could run has run, if some failed (one line each).
    """
    if (benchmark is not None or backbone is not None) and cfg.workers > 1:
        raise ConfigError("a benchmark or backbone object needs workers=1 (it stays in this process)")
    t0 = time.time()
    jobs = plan(cfg)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers and the notebook kernels
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    done = {j.name for j in jobs if j.status == "cached"}
    todo = [j for j in jobs if j.status != "cached"]
    failed: dict[str, str] = {}
    cpu: dict[str, float] = {}  # CPU seconds per kind of job
    blocked: list[str] = []
    tables: list[Path] = []
    written = False
    bar = tqdm(total=len(jobs), initial=len(done), desc="reproduce", unit="job", disable=not progress)
    pool = ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"), initializer=init_worker) \
        if cfg.workers > 1 else None  # fmt: skip
    running: dict[Future, tuple[Job, float]] = {}
    try:
        while True:
            busy = [j for j in [*todo, *(r[0] for r in running.values())] if j.kind != "notebook"]
            if not written and not busy:  # every run and edit is done (or failed): the tables
                tables, written = write_tables(cfg, jobs), True
            ready = sorted((j for j in todo if _ready(j, done, written)), key=_priority)
            if not ready and not running:
                break
            for job in ready[: (cfg.workers - len(running)) if pool else 1]:
                todo.remove(job)
                bar.set_postfix_str(job.name[:40])
                if pool is None:
                    running[_immediate(job, benchmark, backbone)] = (job, time.time())
                else:
                    running[pool.submit(execute, job.kind, job.args)] = (job, time.time())
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job, start = running.pop(fut)
                try:
                    cpu[job.kind] = cpu.get(job.kind, 0.0) + fut.result()
                except Exception as e:  # noqa: BLE001 - reported with the job's name, the others go on
                    failed[job.name] = f"{type(e).__name__}: {e}".splitlines()[0]
                    blocked += [j.name for j in todo if job.name in j.after]
                    todo = [j for j in todo if job.name not in j.after]
                else:
                    done.add(job.name)
                    job.seconds = time.time() - start
                    if job.kind == "notebook":
                        _record_notebook(cfg, job)
                bar.update(1)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    summary = {"jobs": len(jobs), "done": len(done), "cached": sum(j.status == "cached" for j in jobs),
               "failed": failed, "blocked": blocked, "tables": [str(p) for p in tables],
               "seconds": round(time.time() - t0, 1),
               "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()}}  # fmt: skip
    Path(cfg.cache).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.cache) / "summary.json", summary)  # also when some job failed
    if failed:
        reasons = "; ".join(f"{k}: {v}" for k, v in failed.items())
        skipped = f", {len(blocked)} not run" if blocked else ""
        raise CompolabError(f"{len(failed)} job(s) failed ({reasons}){skipped}; the finished ones stay in "
                            "the cache: run again to retry")  # fmt: skip
    return summary


def _immediate(job: Job, benchmark, backbone) -> Future:
    """Run a job in this process; a finished future with its result or exception."""
    fut: Future = Future()
    extra = {"benchmark": benchmark, "backbone": backbone} if job.kind != "notebook" else {}
    try:
        fut.set_result(execute(job.kind, {**job.args, **extra}))
    except Exception as e:  # noqa: BLE001 - delivered through the future, as from a worker
        fut.set_exception(e)
    return fut


def _record_notebook(cfg: ReproduceConfig, job: Job) -> None:
    """Record a finished notebook job (:func:`~compolab.reproduce.notebooks.record_notebook`)."""
    record_notebook(cfg.cache, job.name, job.args["path"], job.args["key"], job.seconds or 0.0)
