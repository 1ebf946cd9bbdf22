"""What ``compolab reproduce`` makes: its config, its jobs and their estimated cost.

:func:`plan` lists every job of a :class:`ReproduceConfig` with its status in the cache and runs
nothing; :func:`format_plan` is ``compolab reproduce --plan``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from compolab.config import TINY_DATASETS, get_preset
from compolab.errors import ConfigError
from compolab.io import canonical_json, file_sha256, read_json
from compolab.merge_pool import DEFAULT_MERGES, GRIDS
from compolab.methods import get_method
from compolab.reproduce.notebooks import notebook_key, notebook_record
from compolab.run import RunConfig, run_config
from compolab.tables.policy import (
    CLAIM_METHODS,
    CURVATURE_POOLS,
    CURVATURE_ROWS,
    MERGED_POOLS,
    SAME_RUN,
    SEEDED_CURVATURE_ROWS,
    SEEDED_ROWS,
    TABLE_METHODS,
)
from compolab.tuning import STYLES

__all__ = ["ReproduceConfig", "Job", "plan", "format_plan", "CLI_FLAGS"]

#: The benchmark ``reproduce`` trains on the tiny preset: 10 tasks × 10 classes
#: (:data:`compolab.config.TINY_DATASETS`), the shape of Split CIFAR-100.
TINY_DATASET = "tiny10"
#: Epochs per task of the tiny runs on the preset's shared schedule (the preset: 4). Measured on
#: seed 0: ITA full 71.7 vs 70.2 %, ITA LoRA 80.4 vs 80.0 %, IEL LoRA 76.8 vs 77.9 %, for 25 % less
#: training. TMC keeps its own schedule (8 epochs, chosen on the validation split).
TINY_EPOCHS = 3
#: Seconds per training image and epoch on one CPU thread of the tiny ViT, everything of a run
#: included (pre-tuning, Fisher, evaluation); measured by a cold ``compolab reproduce``.
SECONDS_PER_IMAGE_EPOCH = {"full": 5.0e-3, "lora": 4.5e-3, "ia3": 4.0e-3}
#: A linearised (TMC) step costs about this many plain ones (``compolab bench tmc``).
LINEARISED_FACTOR = 2.0
#: A run with K-FAC curvature costs about this many diagonal ones on tiny10: ``compolab bench step``
#: measures 1.4× (ITA) / 1.8× (IEL) with 2–3 previous tasks; over 10 tasks the penalty sums up to 9.
KFAC_FACTOR = 2.0
#: Estimates of the other jobs (seconds, one thread; a cold ``compolab reproduce`` of tiny10).
EDITS_SECONDS, MERGES_SECONDS, NOTEBOOK_SECONDS, CURVATURE_SECONDS = 55.0, 150.0, 90.0, 70.0
#: The probe of the curvature table's jobs (:func:`compolab.reproduce.runs.job_curvature`): training
#: images per task, and the Monte-Carlo labels per image of the K-FAC and the diagonal Fisher (on 10
#: images of each of tiny10's tasks, 8 labels give Ω within 5 % of the exact Fisher's, 10× cheaper).
CURVATURE_PROBE = {"per_task": 10, "mc_samples": 8}
#: The fields whose ``compolab reproduce`` flag is not ``--`` + the field (``_`` → ``-``).
CLI_FLAGS: dict[str, str] = {"num_tasks": "--tasks"}
#: The fields :meth:`ReproduceConfig.command` spells when they differ from the default, in order.
_COMMAND_FIELDS = ("preset", "dataset", "seeds", "out", "cache", "num_tasks", "epochs", "methods", "styles")


@dataclass(frozen=True)
class ReproduceConfig:
    """What ``compolab reproduce`` makes.

    Attributes:
        preset: ``tiny``, ``paper`` or ``real-small``.
        seeds: Seeds of the runs that carry asserted claims (the others: seed 0).
        out: Figures folder; the tables go to ``<out>/tables`` (default ``figures``, and
            ``figures/<preset>`` for another preset than tiny: its tables never overwrite tiny's).
        cache: Run folders and cached measurements (default ``runs/reproduce``, and
            ``runs/reproduce-<preset>`` for another preset).
        workers: Processes (one thread each); 1 runs every job in this process.
        notebooks: Folder of the notebooks to execute (None: none).
        num_tasks: Tasks per run (default: all tasks of the benchmark).
        dataset: The benchmark (default: :data:`TINY_DATASET` on tiny, the preset's otherwise).
        epochs: Epochs per task (default: the preset's, per method).
        methods: Methods of the grid (default ``TABLE_METHODS``).
        styles: Tuning styles of the grid (default: all).
        edit_style: The style of the editing tables and of the extra seeds.
        device: Training device (``cpu``, ``cuda``, ``auto``).
        negate_coef: γ of negated modules, relative to the kept ones' weight.
        merges: Merge the pools of :data:`~compolab.tables.policy.MERGED_POOLS` every way
            (:mod:`compolab.merging`) for the merging tables (default: yes, but on real-small).
        kfac: Train the rows of :data:`~compolab.tables.policy.CURVATURE_ROWS` again with K-FAC
            curvature (needs curvlinops; default: yes, but on real-small, whose modules are
            convolutions that K-FAC does not cover).

    Raises:
        ConfigError: For a bad field; the message names it in backticks (``seeds``, ...).
    """

    preset: str = "tiny"
    seeds: int = 3
    out: str | None = None
    cache: str | None = None
    workers: int = 2
    notebooks: str | None = "notebooks"
    num_tasks: int | None = None
    dataset: str | None = None
    epochs: int | None = None
    methods: tuple[str, ...] = TABLE_METHODS
    styles: tuple[str, ...] = tuple(STYLES)
    edit_style: str = "lora"
    device: str = "cpu"
    negate_coef: float = 1.0
    merges: bool | None = None
    kfac: bool | None = None

    def __post_init__(self) -> None:
        get_preset(self.preset)
        tiny, linear = self.preset == "tiny", self.preset != "real-small"
        defaults = {"out": "figures" if tiny else f"figures/{self.preset}",
                    "cache": "runs/reproduce" if tiny else f"runs/reproduce-{self.preset}",
                    "merges": linear, "kfac": linear}  # fmt: skip
        for f, value in defaults.items():
            if getattr(self, f) is None:
                object.__setattr__(self, f, value)  # frozen: resolved once, here
        if self.kfac and not linear:
            raise ConfigError(f"`kfac`: the {self.preset} preset's modules are 1×1 convolutions, which "
                              "K-FAC does not cover")  # fmt: skip
        for f in ("seeds", "workers", "num_tasks", "epochs"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ConfigError(f"`{f}` must be >= 1, got {getattr(self, f)}")
        for m in self.methods:
            get_method(m)
        if not self.methods:
            raise ConfigError("`methods` names no method")
        for f, styles in (("styles", self.styles), ("edit_style", (self.edit_style,))):
            bad = [s for s in styles if s not in STYLES]
            if bad or not styles:
                raise ConfigError(f"`{f}`: choose tuning styles among {list(STYLES)}; got {bad}")
        for f in ("out", "cache"):
            if Path(getattr(self, f)).is_file():
                raise ConfigError(f"`{f}` {getattr(self, f)} is a file, not a folder")
        if self.notebooks is not None and not Path(self.notebooks).is_dir():
            raise ConfigError(f"`notebooks` {self.notebooks} is not a folder")

    def command(self) -> str:
        """The ``compolab reproduce`` command line of this config (its non-default options).

        Examples:
            >>> ReproduceConfig(seeds=1, num_tasks=2, styles=("lora",), notebooks=None).command()
            'compolab reproduce --seeds 1 --tasks 2 --styles lora'
        """
        default, parts = ReproduceConfig(self.preset, notebooks=None), ["compolab reproduce"]
        for f in _COMMAND_FIELDS:
            value = getattr(self, f)
            if value != (getattr(default, f) if f != "preset" else "tiny"):
                flag = CLI_FLAGS.get(f, "--" + f.replace("_", "-"))
                parts.append(f"{flag} {','.join(value) if isinstance(value, tuple) else value}")
        return " ".join(parts)

    @property
    def tasks(self) -> int | None:
        """Tasks per run: ``num_tasks``, else None (all)."""
        return self.num_tasks

    @property
    def benchmark(self) -> str | None:
        """The runs' dataset: ``dataset``, else :data:`TINY_DATASET` on tiny, else None (the preset's)."""
        return self.dataset if self.dataset is not None else TINY_DATASET if self.preset == "tiny" else None


@dataclass
class Job:
    """One unit of work: a ``run``, the ``edits``, ``merges`` or ``curvature`` probe of a run's pool, or a
    ``notebook``.

    Attributes:
        kind: ``run``, ``edits``, ``merges``, ``curvature`` or ``notebook``.
        name: Unique; a run's is its folder name.
        cost: Estimated seconds (None: unknown).
        args: The job function's keyword arguments.
        after: Names of the jobs (or ``tables``) that must be done first.
        status: ``new``, ``partial`` (a run to resume) or ``cached`` (nothing to do).
        seconds: Measured wall time (of a cached run, or once done).
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

    def add(method: str, style: str, ablation: str = "none", seed: int = 0, curvature: str = "diag") -> None:
        epochs = cfg.epochs
        if epochs is None and cfg.preset == "tiny" and not get_method(method).finetune_overrides.get("tiny"):
            epochs = TINY_EPOCHS  # the methods on the preset's shared schedule; TMC keeps its own
        out.append(run_config(method, style, preset=cfg.preset, dataset=cfg.benchmark, ablation=ablation,
                              seed=seed, num_tasks=cfg.tasks, epochs=epochs,
                              curvature=curvature))  # fmt: skip

    def wanted(rows: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        return [(m, s) for m, s in rows if m in cfg.methods and s in cfg.styles]

    for method in cfg.methods:
        m = get_method(method)  # the references and TMC once, in the editing style
        for style in cfg.styles if m.editable and not m.linearised else [cfg.edit_style]:
            for ablation in ("none", *m.ablation_labels):
                same = SAME_RUN.get((method, ablation))
                if same is None or same[0] not in cfg.methods:  # else that run stands for this one
                    add(method, style, ablation)
    for method, style in wanted(CURVATURE_ROWS) if cfg.kfac else []:
        add(method, style, curvature="kfac")
    for seed in range(1, cfg.seeds):
        for method in (m for m in CLAIM_METHODS if m in cfg.methods):
            add(method, cfg.edit_style, seed=seed)
        for method, style in wanted(SEEDED_ROWS):  # other composition rows the notebooks assert over seeds
            add(method, style, seed=seed)
        for method, style in wanted(SEEDED_CURVATURE_ROWS) if cfg.kfac else []:
            add(method, style, seed=seed, curvature="kfac")
    return out


def _run_name(rc: RunConfig) -> str:
    """``<method>-<style>[-<ablation>][-<curvature>]-s<seed>-<first 8 hex digits of the config's sha256>``."""
    ablation = "" if rc.method_cfg.ablation == "none" else f"-{rc.method_cfg.ablation}"
    ablation += "" if rc.method_cfg.curvature == "diag" else f"-{rc.method_cfg.curvature}"
    digest = hashlib.sha256(canonical_json(rc.to_json())).hexdigest()[:8]
    return f"{rc.method}-{rc.finetune.style}{ablation}-s{rc.finetune.seed}-{digest}"


def _run_cost(cfg: ReproduceConfig, rc: RunConfig) -> float | None:
    """Estimated seconds of a run on one CPU thread (tiny preset only)."""
    if cfg.preset != "tiny":
        return None
    world = replace(get_preset(cfg.preset).world, **TINY_DATASETS.get(rc.dataset or "tiny", {}))
    images = world.train_per_class * world.classes_per_task * (rc.num_tasks or world.num_tasks)
    factor = LINEARISED_FACTOR if get_method(rc.method).linearised else 1.0
    factor *= KFAC_FACTOR if rc.method_cfg.curvature == "kfac" else 1.0
    return images * rc.finetune.epochs * SECONDS_PER_IMAGE_EPOCH[rc.finetune.style] * factor


def _run_jobs(cfg: ReproduceConfig, cache: Path) -> list[Job]:
    """Each run of the grid, followed by the edits of its pool when the editing tables need them."""
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
        seeded = rc.finetune.seed == 0 or rc.method in CLAIM_METHODS  # the other seeds: FA rows only
        paper_row = rc.method_cfg.ablation == "none" and rc.method_cfg.curvature == "diag"
        edited = rc.finetune.style == cfg.edit_style and paper_row and seeded
        if method.editable and edited:
            path = cache / "edits" / f"{name}.json"
            done = _measured(status, path, out)
            cost = EDITS_SECONDS * (LINEARISED_FACTOR if method.linearised else 1.0)
            args = {"run_dir": str(out), "path": str(path), "negate_coef": cfg.negate_coef,
                    "device": cfg.device}  # fmt: skip
            jobs.append(Job("edits", f"edits {name}", cost, args, after=(name,),
                            status="cached" if done else "new"))  # fmt: skip
        merged = (rc.method, rc.finetune.style) in MERGED_POOLS and paper_row
        if cfg.merges and merged and rc.finetune.seed == 0:
            path = cache / "merges" / f"{name}.json"
            args = {"run_dir": str(out), "path": str(path)}
            grids = json.loads(json.dumps({n: GRIDS[n] for n in DEFAULT_MERGES}))  # as the cache holds them
            done = _measured(status, path, out) and read_json(path).get("grids") == grids
            jobs.append(Job("merges", f"merges {name}", MERGES_SECONDS, args, after=(name,),
                            status="cached" if done else "new"))  # fmt: skip
        probed = (rc.method, rc.finetune.style, rc.method_cfg.curvature) in CURVATURE_POOLS
        if cfg.kfac and probed and rc.method_cfg.ablation == "none":
            path = cache / "curvature" / f"{name}.json"
            args = {"run_dir": str(out), "path": str(path), **CURVATURE_PROBE}
            done = _measured(status, path, out) and read_json(path).get("settings") == CURVATURE_PROBE
            jobs.append(Job("curvature", f"curvature {name}", CURVATURE_SECONDS, args, after=(name,),
                            status="cached" if done else "new"))  # fmt: skip
    return jobs


def _measured(status: str, path: Path, out: Path) -> bool:
    """Whether a cached measurement of a finished run is of its current results."""
    return status == "cached" and path.exists() and \
        read_json(path).get("results_sha256") == file_sha256(out / "results.json")  # fmt: skip


def _notebook_jobs(cfg: ReproduceConfig, fresh_tables: bool) -> list[Job]:
    """The notebooks that save figures; one that reads the tables waits for them (and reruns when
    they change, ``fresh_tables`` False)."""
    record = notebook_record(cfg.cache)
    jobs: list[Job] = []
    for nb in sorted(Path(cfg.notebooks).glob("*.ipynb")):
        text = nb.read_text(encoding="utf-8")
        if "savefig(" not in text:
            continue  # draws no figure for the figures folder
        key, seen = notebook_key(nb, cfg.out), record.get(nb.name, {})
        after = ("tables",) if "figures/tables" in text else ()
        cached = seen.get("key") == key and (fresh_tables or not after)
        last = json.loads(text).get("metadata", {}).get("compolab", {}).get("seconds")  # committed
        jobs.append(Job("notebook", nb.name, seen.get("seconds", last or NOTEBOOK_SECONDS),
                        {"path": str(nb), "figures": str(Path(cfg.out).resolve()), "key": key},
                        after=after, status="cached" if cached else "new"))  # fmt: skip
    return jobs


def plan(cfg: ReproduceConfig) -> list[Job]:
    """Every job of ``cfg``, with its status in the cache and its estimated cost; runs nothing."""
    jobs = _run_jobs(cfg, Path(cfg.cache) / f"{cfg.benchmark or cfg.preset}-T{cfg.tasks or 'all'}")
    if cfg.notebooks is not None:
        fresh_tables = all(j.status == "cached" for j in jobs)  # else the tables change: their readers rerun
        jobs += _notebook_jobs(cfg, fresh_tables)
    return jobs


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
