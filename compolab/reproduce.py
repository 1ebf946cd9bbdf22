r"""``compolab reproduce``: every run the tables need (cached, resumable), the tables, every figure.

One command, one overall progress bar, four kinds of jobs:

1. **runs** (:func:`plan`) under ``cache``: the composition grid — every editable method of
   ``TABLE_METHODS`` × tuning style, ITA and IEL also with their ablations ("without Eq. 12 / 19",
   "only on CLS"; a row that is another's computation, :data:`~compolab.methods.SAME_RUN`, is
   trained once), and the references (sequential fine-tuning, joint training) and TMC (one row
   in the paper's Table 1; its 8-epoch linearised run costs about four 3-epoch plain ones) once,
   in the editing style — for seed 0, and the methods whose editing claims are asserted
   (``CLAIM_METHODS``) in the editing style for seeds 1 … N−1. The tiny preset trains the first
   3 tasks of the tiny world, :data:`TINY_EPOCHS` epochs per task. A run's folder name carries a
   hash of its config: a finished run is reused, a killed one resumes (the kit's ``--resume``), a
   changed config is a new run;
2. **edits** of every editable pool of the editing style (:func:`compolab.measure.measure_edits`),
   cached as JSON next to the runs;
3. **tables** under ``<out>/tables/``: composition, unlearning, specialization (markdown + CSV,
   :mod:`compolab.tables`), written as soon as the runs and edits are done;
4. **notebooks** that save figures, executed in place by ``jupyter nbconvert`` (inline figures
   embedded, each figure also written to ``<out>`` through ``COMPOLAB_FIGURES_DIR``); a notebook
   that reads ``figures/tables`` runs after the tables. A notebook is skipped when neither its code nor the
   kit changed since it last ran into the same ``<out>``.

Jobs run on ``workers`` processes with one thread each (2 on the 2-core CPU the tiny preset
targets), runs first and the longest first. ``--plan`` lists the jobs and their estimated cost
without running anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from compolab.config import get_preset
from compolab.errors import CompolabError, ConfigError
from compolab.io import canonical_json, file_sha256, read_json, write_json
from compolab.measure import measure_edits, read_run
from compolab.methods import CLAIM_METHODS, SAME_RUN, TABLE_METHODS, get_method
from compolab.run import RunConfig, run, run_config
from compolab.tables import composition_table, specialization_table, unlearning_table, write_table
from compolab.tuning import STYLES

__all__ = ["ReproduceConfig", "Job", "plan", "reproduce", "format_plan"]

#: Tasks of the tiny world that ``reproduce`` trains (the first three of five).
TINY_TASKS = 3
#: Epochs per task of the tiny runs on the preset's shared schedule (the preset: 4). Measured on
#: seed 0: ITA full 71.7 vs 70.2 %, ITA LoRA 80.4 vs 80.0 %, IEL LoRA 76.8 vs 77.9 %, for 25 % less
#: training. TMC keeps its own schedule (8 epochs, chosen on the validation split).
TINY_EPOCHS = 3
#: Seconds per training image and epoch on one CPU thread of the tiny ViT, everything of a run
#: included (pre-tuning, Fisher, evaluation); measured by a cold ``compolab reproduce``.
SECONDS_PER_IMAGE_EPOCH = {"full": 5.0e-3, "lora": 4.5e-3, "ia3": 4.0e-3}
#: A linearised (TMC) step costs about this many plain ones (``compolab bench tmc``).
LINEARISED_FACTOR = 2.0
#: Default estimates of the other jobs (seconds) until the cache holds measured ones.
EDITS_SECONDS, NOTEBOOK_SECONDS = 10.0, 90.0


@dataclass(frozen=True)
class ReproduceConfig:
    """What ``compolab reproduce`` makes.

    Attributes:
        preset: ``tiny`` or ``paper``.
        seeds: Seeds of the runs that carry asserted claims (the others: seed 0).
        out: Figures folder; the tables go to ``<out>/tables``.
        cache: Run folders and cached measurements.
        workers: Processes (one thread each); 1 runs every job in this process.
        notebooks: Folder of the notebooks to execute (None: none).
        num_tasks: Tasks per run (default: 3 for tiny, all for paper).
        epochs: Epochs per task (default: the preset's, per method).
        methods: Methods of the grid (default ``TABLE_METHODS``).
        styles: Tuning styles of the grid (default: all).
        edit_style: The style of the editing tables and of the extra seeds.
        device: Training device (``cpu``, ``cuda``, ``auto``).
        negate_coef: γ of negated modules, relative to the kept ones' weight.
    """

    preset: str = "tiny"
    seeds: int = 3
    out: str = "figures"
    cache: str = "runs/reproduce"
    workers: int = 2
    notebooks: str | None = "notebooks"
    num_tasks: int | None = None
    epochs: int | None = None
    methods: tuple[str, ...] = TABLE_METHODS
    styles: tuple[str, ...] = tuple(STYLES)
    edit_style: str = "lora"
    device: str = "cpu"
    negate_coef: float = 1.0

    def __post_init__(self) -> None:
        get_preset(self.preset)
        for f in ("seeds", "workers"):
            if getattr(self, f) < 1:
                raise ConfigError(f"--{f} must be >= 1, got {getattr(self, f)}")
        for f in ("num_tasks", "epochs"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ConfigError(f"--{f.replace('num_', '')} must be >= 1, got {getattr(self, f)}")
        for m in self.methods:
            get_method(m)
        bad = [s for s in (*self.styles, self.edit_style) if s not in STYLES]
        if bad or not self.methods or not self.styles:
            raise ConfigError(f"choose tuning styles among {list(STYLES)} and at least one method; got {bad}")
        for f in ("out", "cache"):
            if Path(getattr(self, f)).is_file():
                raise ConfigError(f"--{f} {getattr(self, f)} is a file, not a folder")
        if self.notebooks is not None and not Path(self.notebooks).is_dir():
            raise ConfigError(f"--notebooks {self.notebooks} is not a folder")

    def command(self) -> str:
        """The ``compolab reproduce`` command line of this config (its non-default options)."""
        default, parts = ReproduceConfig(notebooks=None), ["compolab reproduce"]
        flags = {"preset": "--preset", "seeds": "--seeds", "out": "--out", "cache": "--cache",
                 "num_tasks": "--tasks", "epochs": "--epochs", "methods": "--methods", "styles": "--styles"}
        for f, flag in flags.items():
            value = getattr(self, f)
            if value != getattr(default, f):
                parts.append(f"{flag} {','.join(value) if isinstance(value, tuple) else value}")
        return " ".join(parts)

    @property
    def tasks(self) -> int | None:
        return self.num_tasks if self.num_tasks is not None else TINY_TASKS if self.preset == "tiny" else None


@dataclass
class Job:
    """One unit of work: a ``run``, the ``edits`` of a run's pool, or a ``notebook``.

    Attributes:
        kind: ``run``, ``edits`` or ``notebook``.
        name: Unique; a run's is its folder name.
        cost: Estimated seconds (None: unknown).
        args: The job function's keyword arguments.
        after: Names of the jobs (or ``tables``) that must be done first.
        status: ``new``, ``partial`` (a run to resume) or ``cached`` (nothing to do).
    """

    kind: str
    name: str
    cost: float | None
    args: dict
    after: tuple[str, ...] = ()
    status: str = "new"
    seconds: float | None = field(default=None, compare=False)


def _run_configs(cfg: ReproduceConfig) -> list[RunConfig]:
    """The grid for seed 0, then the claim rows for the other seeds."""
    out = []

    def add(method: str, style: str, ablation: str = "none", seed: int = 0) -> None:
        epochs = cfg.epochs
        if epochs is None and cfg.preset == "tiny" and not get_method(method).finetune_overrides.get("tiny"):
            epochs = TINY_EPOCHS  # the methods on the preset's shared schedule; TMC keeps its own
        out.append(run_config(method, style, preset=cfg.preset, ablation=ablation, seed=seed,
                              num_tasks=cfg.tasks, epochs=epochs))  # fmt: skip

    for method in cfg.methods:
        m = get_method(method)  # the references and TMC once, in the editing style
        for style in cfg.styles if m.editable and not m.linearised else [cfg.edit_style]:
            for ablation in ("none", *m.ablation_labels):
                same = SAME_RUN.get((method, ablation))
                if same is None or same[0] not in cfg.methods:  # else that run stands for this one
                    add(method, style, ablation)
    for seed in range(1, cfg.seeds):
        for method in (m for m in CLAIM_METHODS if m in cfg.methods):
            add(method, cfg.edit_style, seed=seed)
    return out


def _run_name(rc: RunConfig) -> str:
    ablation = "" if rc.method_cfg.ablation == "none" else f"-{rc.method_cfg.ablation}"
    digest = hashlib.sha256(canonical_json(rc.to_json())).hexdigest()[:8]
    return f"{rc.method}-{rc.finetune.style}{ablation}-s{rc.finetune.seed}-{digest}"


def _run_cost(cfg: ReproduceConfig, rc: RunConfig) -> float | None:
    """Estimated seconds of a run on one CPU thread (tiny preset only)."""
    if cfg.preset != "tiny":
        return None
    world = get_preset(cfg.preset).world
    images = world.train_per_class * world.classes_per_task * (rc.num_tasks or world.num_tasks)
    factor = LINEARISED_FACTOR if get_method(rc.method).linearised else 1.0
    return images * rc.finetune.epochs * SECONDS_PER_IMAGE_EPOCH[rc.finetune.style] * factor


def _notebook_key(path: Path, out: str) -> str:
    """Hash of a notebook's code, of the kit's sources and of the figures folder."""
    h = hashlib.sha256(str(Path(out).resolve()).encode())
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    h.update("".join("".join(c["source"]) for c in cells if c["cell_type"] == "code").encode())
    for src in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(src.read_bytes())
    return h.hexdigest()


def plan(cfg: ReproduceConfig) -> list[Job]:
    """Every job of ``cfg``, with its status in the cache and its estimated cost; runs nothing."""
    cache = Path(cfg.cache) / f"{cfg.preset}-T{cfg.tasks or 'all'}"
    jobs: list[Job] = []
    for rc in _run_configs(cfg):
        name, out = _run_name(rc), cache / _run_name(rc)
        results = read_json(out / "results.json") if (out / "results.json").exists() else {}
        finished = results.get("final_accuracy") is not None
        status = "cached" if finished else "partial" if (out / "config.json").exists() else "new"
        jobs.append(Job("run", name, _run_cost(cfg, rc), {"config": rc.to_json(), "out": str(out),
                                                              "device": cfg.device}, status=status,
                        seconds=results.get("wall_seconds") if finished else None))  # fmt: skip
        method = get_method(rc.method)
        if method.editable and rc.finetune.style == cfg.edit_style and rc.method_cfg.ablation == "none":
            path = cache / "edits" / f"{name}.json"
            done = status == "cached" and path.exists() and read_json(path).get(
                "results_sha256") == file_sha256(out / "results.json")
            cost = EDITS_SECONDS * (LINEARISED_FACTOR if method.linearised else 1.0)
            args = {"run_dir": str(out), "path": str(path), "negate_coef": cfg.negate_coef,
                    "device": cfg.device}  # fmt: skip
            jobs.append(Job("edits", f"edits {name}", cost, args, after=(name,),
                            status="cached" if done else "new"))  # fmt: skip
    if cfg.notebooks is not None:
        record = _notebook_record(cfg)
        fresh_tables = all(j.status == "cached" for j in jobs)  # else the tables change: their readers rerun
        for nb in sorted(Path(cfg.notebooks).glob("*.ipynb")):
            text = nb.read_text(encoding="utf-8")
            if "savefig(" not in text:
                continue  # draws no figure for the figures folder
            key, seen = _notebook_key(nb, cfg.out), record.get(nb.name, {})
            after = ("tables",) if "figures/tables" in text else ()
            cached = seen.get("key") == key and (fresh_tables or not after)
            last = json.loads(text).get("metadata", {}).get("compolab", {}).get("seconds")  # committed
            jobs.append(Job("notebook", nb.name, seen.get("seconds", last or NOTEBOOK_SECONDS),
                            {"path": str(nb), "figures": str(Path(cfg.out).resolve()), "key": key},
                            after=after, status="cached" if cached else "new"))  # fmt: skip
    return jobs


def _notebook_record(cfg: ReproduceConfig) -> dict:
    path = Path(cfg.cache) / "notebooks.json"
    return read_json(path, what="notebook record") if path.exists() else {}


def format_plan(jobs: Sequence[Job], workers: int) -> str:
    """The plan as text: one line per job, then the totals."""
    lines = [f"{'job':58s} {'kind':9s} {'status':8s} {'est. s':>7s}"]
    todo = [j for j in jobs if j.status != "cached"]
    for j in jobs:
        cost = "?" if j.cost is None else f"{j.cost:.0f}"
        lines.append(f"{j.name:58s} {j.kind:9s} {j.status:8s} {cost:>7s}")
    known = [j.cost for j in todo if j.cost is not None]
    total = sum(known)
    lines.append(f"{len(jobs)} jobs, {len(todo)} to do: ≈ {total:.0f} s of work"
                 f"{' (+ unknown)' if len(known) < len(todo) else ''}, ≈ {total / workers / 60:.1f} min "
                 f"on {workers} worker(s)")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- the jobs


def _init_worker() -> None:
    """A worker process: one thread (the jobs run side by side on the cores)."""
    import torch

    torch.set_num_threads(1)


def job_run(config: dict, out: str, device: str = "cpu", benchmark=None, backbone=None) -> float:
    """Train (or resume, or reuse) one run; returns its final accuracy."""
    from compolab.distributed import Runtime

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


def job_notebook(path: str, figures: str, key: str = "", timeout: int = 1800) -> None:
    """Execute a notebook in place (inline figures embedded; ``savefig`` writes to ``figures``).

    Raises:
        CompolabError: If a cell fails (the last lines of nbconvert's report).
    """
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kit's style picks inline
    env.update(COMPOLAB_FIGURES_DIR=figures, TQDM_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
           f"--ExecutePreprocessor.timeout={timeout}", path]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in done.stderr.splitlines()]
        raise CompolabError(f"notebook {path} failed: {' | '.join([x for x in lines if x][-2:])}")


_FUNCTIONS = {"run": job_run, "edits": job_edits, "notebook": job_notebook}


def _execute(kind: str, args: dict) -> float:
    """Run one job; returns the CPU seconds it used, its subprocesses' (a notebook's kernel) included."""
    import resource

    def cpu() -> float:
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + c.ru_utime + c.ru_stime

    start = cpu()
    _FUNCTIONS[kind](**args)
    return cpu() - start


# --------------------------------------------------------------------------- tables and the scheduler


def write_tables(cfg: ReproduceConfig, jobs: Sequence[Job]) -> list[Path]:
    """The three tables of the finished runs in ``jobs``, as markdown + CSV under ``<out>/tables``."""
    edits = {j.args["run_dir"]: j.args["path"] for j in jobs
             if j.kind == "edits" and Path(j.args["path"]).exists()}  # fmt: skip
    stands_for = {same: row for row, same in SAME_RUN.items() if row[0] in cfg.methods}
    records, shared = [], []
    for j in jobs:
        out = j.args.get("out")
        if j.kind == "run" and (Path(out) / "results.json").exists():
            try:
                record = read_run(out, read_json(edits[out]) if out in edits else None)
            except ValueError:  # not finished
                continue
            records.append(record)
            row = stands_for.get((record.method, record.ablation))
            if row is not None:  # the same run, shown in the row it stands for too
                records.append(replace(record, method=row[0], ablation=row[1], edits=None))
                note = (f"{get_method(row[0]).ablation_labels[row[1]]} and {get_method(record.method).label} "
                        "are one computation (`tests/test_run.py`): trained once, shown in both rows.")
                shared += [note] if note not in shared else []
    folder = Path(cfg.out) / "tables"
    made = f"_Made by `{cfg.command()}` ({cfg.preset} preset, {cfg.tasks or 'all'} tasks)._"
    paths = []
    style = cfg.edit_style
    for stem, table, extra in (("composition", composition_table(records), shared),
                               ("unlearning", unlearning_table(records, style), []),
                               ("specialization", specialization_table(records, style), [])):  # fmt: skip
        table.note = "\n\n".join([table.note, *extra, made]).strip()
        paths += write_table(table, folder, stem)
    return paths


def _ready(job: Job, done: set[str], tables: bool) -> bool:
    return all((a == "tables" and tables) or a in done for a in job.after)


def _priority(job: Job) -> tuple:
    return ({"run": 0, "edits": 1, "notebook": 2}[job.kind], -(job.cost or 0.0), job.name)


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
    pool = ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"), initializer=_init_worker) \
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
                    running[pool.submit(_execute, job.kind, job.args)] = (job, time.time())
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
        fut.set_result(_execute(job.kind, {**job.args, **extra}))
    except Exception as e:  # noqa: BLE001 - delivered through the future, as from a worker
        fut.set_exception(e)
    return fut


def _record_notebook(cfg: ReproduceConfig, job: Job) -> None:
    """Remember a notebook's key and wall time in the cache, and the time in the notebook's own
    metadata (``compolab.seconds``): a fresh clone schedules the longest notebooks first."""
    import nbformat

    seconds = round(job.seconds or 0.0, 1)
    record = _notebook_record(cfg)
    record[job.name] = {"key": job.args["key"], "seconds": seconds}
    Path(cfg.cache).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.cache) / "notebooks.json", record)
    nb = nbformat.read(job.args["path"], as_version=4)
    nb.metadata["compolab"] = {"seconds": seconds}
    nbformat.write(nb, job.args["path"])
