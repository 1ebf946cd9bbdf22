"""A class-incremental run: train one module per task, save the pool, evaluate the composition.

``compolab train`` calls :func:`run`. The output folder holds::

    config.json    the run's configuration (a resumed run must match it exactly)
    pool/          the module pool (``compolab.pool``): one safetensors + JSON card per task
    state/         the method's state after the last committed task (``after_<t>.*``)
    results.json   final_accuracy (%), accuracy_matrix, composed_accuracy, task_seconds, wall_seconds,
                   config, and the commit record (the sha256 of every file a resume needs)
    log.txt        one line per event
    .lock          the OS lock held by the running process

The folder is checked before any work and locked for the run (:mod:`compolab.runfolder`). Each
task is committed as a whole: its module, card and state go to files of its own, then
``results.json`` is replaced atomically as the single commit marker. A run killed anywhere
(:data:`TASK_POINTS`, and every write's ``<file>:<stage>`` of :mod:`compolab.io`) resumes with
``resume=True`` from the last committed task to identical numbers. A NaN / infinite loss stops
the run with :class:`~compolab.errors.TrainingDiverged` (logged); the committed tasks stay valid.

The driver knows no method by name: it asks the :class:`~compolab.methods.Method` which tasks
it trains, how to compose and which tasks to evaluate.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from compolab.config import get_preset, load_benchmark_for, load_theta0, preset_configs
from compolab.data import Benchmark
from compolab.editing import plan_composition
from compolab.errors import ConfigError, TrainingDiverged
from compolab.evaluate import evaluate_tasks
from compolab.finetune import FinetuneConfig
from compolab.io import fault
from compolab.methods import DEFAULT_METHOD, MethodConfig, TaskContext, get_method
from compolab.methods.state import saved_generations, state_path
from compolab.models import fingerprint, theta0_of, tuned_weight_names
from compolab.pool import Pool, PoolEntry
from compolab.runfolder import RunFolder, check_out, load_results
from compolab.runtime import Runtime
from compolab.stem import cache_stem

__all__ = ["TASK_POINTS", "RunConfig", "run_config", "run", "follow", "load_results"]

#: The kill points of a task t, in order (``COMPOLAB_FAULT="task <t>:<point>"``, :func:`compolab.io.fault`):
#: trained (nothing saved), saved (module and card written), finished (state written),
#: evaluated (results not yet committed), committed (previous state not yet deleted).
TASK_POINTS = ("trained", "saved", "finished", "evaluated", "committed")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (stored in ``config.json``).

    Attributes:
        method: A name of ``compolab.methods.METHODS``.
        preset: ``tiny``, ``paper`` or ``real-small``.
        dataset: Benchmark name; default: the preset's.
        finetune: Per-task fine-tuning hyper-parameters (style, epochs, lr, ...).
        method_cfg: The method's own knobs (α, β, ablation, head pipeline).
        checkpoint: θ0 checkpoint (a safetensors file + JSON card); default: the preset's θ0.
        num_tasks: Train only the first ``num_tasks`` tasks of the benchmark (None: all; stored
            in the config only when set).
    """

    method: str = DEFAULT_METHOD
    preset: str = "tiny"
    dataset: str | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    method_cfg: MethodConfig = field(default_factory=MethodConfig)
    checkpoint: str | None = None
    num_tasks: int | None = None

    def __post_init__(self) -> None:
        method = get_method(self.method)  # validates the name
        get_preset(self.preset)  # validates the name
        if self.num_tasks is not None and self.num_tasks <= 0:
            raise ConfigError(f"`num_tasks` must be > 0, got {self.num_tasks}")
        curvature, accepted = self.method_cfg.curvature, getattr(method, "curvatures", ("diag",))
        if curvature not in accepted:  # ITA and IEL name theirs; any other method has the diagonal only
            raise ConfigError(f"`curvature` {curvature!r}: `method` {self.method!r} takes only "
                              f"{list(accepted)}")  # fmt: skip
        if curvature == "kfac" and self.preset == "real-small":
            raise ConfigError("`curvature` 'kfac': its factors cover Linear layers, and the real-small "
                              "preset's modules are on 1×1 convolutions; use 'diag'")  # fmt: skip
        if curvature == "kfac" and self.method_cfg.fisher_top_k is not None:
            raise ConfigError("`curvature` 'kfac' takes no `fisher_top_k` (a knob of the diagonal Fisher)")

    def to_json(self) -> dict:
        data = asdict(self)
        if data["num_tasks"] is None:  # configs of whole benchmarks keep their earlier form
            del data["num_tasks"]
        data["method_cfg"] = self.method_cfg.to_json()  # `curvature` only when not "diag", likewise
        return data

    @classmethod
    def from_json(cls, data: dict) -> RunConfig:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}")
        data["finetune"] = FinetuneConfig(**data.get("finetune", {}))
        data["method_cfg"] = MethodConfig(**data.get("method_cfg", {}))
        return cls(**data)


def run(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = True,
    benchmark: Benchmark | None = None,
    backbone: nn.Module | None = None,
    runtime: Runtime | str | torch.device | None = None,
    data_root: str | Path | None = None,
) -> dict:
    """Train ``cfg.method`` on every task of the benchmark; returns the results dict.

    Args:
        cfg: The run configuration.
        out: Output folder (created).
        resume: Continue a run in ``out`` with the same config, at its first unfinished task.
        progress: Show progress bars.
        benchmark: Use this benchmark instead of the preset's (tests, notebooks).
        backbone: Use this θ0 instead of the preset's.
        runtime: Device, precision, physical batch, workers (:class:`~compolab.runtime.Runtime`), or a
            device (float32 there); default the CPU. Under ``torchrun`` this is rank 0's call; the
            other ranks call :func:`follow`.
        data_root: The folder of the real datasets (default: the preset's, ``$COMPOLAB_DATA`` or
            ``./data``); not part of the config, so a moved dataset resumes the same run.

    Raises:
        ConfigError: Before any training, for a bad config, an empty task, an ``out`` that is
            not a new / empty folder or a run (``resume``) with this config, or one that another
            process holds.
        TrainingDiverged: If a loss becomes NaN / infinite (committed tasks stay saved).
    """
    out = Path(out)
    config_json = json.loads(json.dumps(cfg.to_json()))  # as config.json reads back
    check_out(out, config_json, resume)  # before the expensive set-up; again under the lock
    runtime = Runtime.of(runtime)
    bench, theta0_model, theta0, names = _run_world(cfg, benchmark, backbone, runtime.device, data_root)
    sha = fingerprint(theta0_model)
    folder = RunFolder.open(out, config_json, resume)
    try:
        return _run_tasks(cfg, folder, bench, theta0_model, theta0, names, sha, runtime, progress)
    finally:
        folder.close()


def _run_tasks(
    cfg: RunConfig, folder: RunFolder, bench: Benchmark, theta0_model: nn.Module, theta0: dict,
    names: list[str], sha: str, runtime: Runtime, progress: bool | None,
) -> dict:  # fmt: skip
    """The task loop of :func:`run`, in a locked and recovered run folder, one commit per task."""
    out = folder.root
    pool = Pool.create(out / "pool", theta0_sha256=sha, benchmark={"name": bench.name, **bench.info},
                       preset=cfg.preset, checkpoint=cfg.checkpoint, method=cfg.method)  # fmt: skip
    results = folder.results or {
        "config": cfg.to_json(), "benchmark": bench.name, "num_tasks": bench.num_tasks,
        "accuracy_matrix": [], "composed_accuracy": [], "task_seconds": [], "final_accuracy": None,
        "wall_seconds": 0.0,
    }  # fmt: skip
    wall_before, t_start = results.get("wall_seconds", 0.0), time.time()
    done = len(results["accuracy_matrix"])
    log = open(out / "log.txt", "a")  # noqa: SIM115 - kept open for the whole run
    if folder.resumed:
        dropped = f": discarded the uncommitted {', '.join(folder.discarded)}" if folder.discarded else ""
        log.write(f"{time.strftime('%H:%M:%S')} resume after {done} committed task(s){dropped}\n")
    method = get_method(cfg.method)
    state_dir = out / "state"
    ctx = TaskContext(method, cfg.finetune, cfg.method_cfg, bench, theta0_model, theta0, names,
                      progress=progress, state_dir=state_dir, runtime=runtime)  # fmt: skip
    entries = pool.load_all(theta0_sha256=sha, theta0=theta0) if done else {}
    entries = {t: e for t, e in entries.items() if t < done}
    ctx.restore(entries)
    for t in method.tasks(bench):
        if t < done:
            continue
        t0 = time.time()
        log.write(f"{time.strftime('%H:%M:%S')} task {t}: training ({cfg.method}, {cfg.finetune.style})\n")
        log.flush()
        try:
            entry = method.train(ctx, t)
        except TrainingDiverged as e:
            log.write(f"{time.strftime('%H:%M:%S')} task {t}: stopped, {e}\n")
            log.close()
            raise
        fault(f"task {t}:trained")
        pool.save(entry)
        entries[t] = entry
        fault(f"task {t}:saved")
        before = set(saved_generations(state_dir))
        ctx.finish(entry)
        fault(f"task {t}:finished")
        seconds = time.time() - t0
        row = _evaluate_after(ctx, entries, t)
        fault(f"task {t}:evaluated")
        results["accuracy_matrix"].append(row)
        results["composed_accuracy"].append(round(sum(row) / len(row), 2))
        results["task_seconds"].append(round(seconds, 2))
        results["wall_seconds"] = round(wall_before + time.time() - t_start, 1)
        new_state = [state_path(state_dir, t)] if state_path(state_dir, t).exists() else []
        old_state = [state_path(state_dir, s) for s in before if s != t] if new_state else []
        folder.commit(results, add=[pool.card_path(t), *new_state], drop=old_state)
        fault(f"task {t}:committed")
        log.write(f"{time.strftime('%H:%M:%S')} task {t}: {seconds:.1f}s, accuracy {row}\n")
        log.flush()
    last = results["accuracy_matrix"][-1]
    results["final_accuracy"] = round(sum(last) / len(last), 2)
    results["wall_seconds"] = round(wall_before + time.time() - t_start, 1)
    folder.write_results(results)
    log.close()
    return results


def _run_world(
    cfg: RunConfig, benchmark: Benchmark | None, backbone: nn.Module | None, device: torch.device,
    data_root: str | Path | None = None,
) -> tuple[Benchmark, nn.Module, dict, list[str]]:  # fmt: skip
    """The benchmark (its first ``cfg.num_tasks`` tasks) and θ0 of a run, θ0 frozen on ``device``."""
    preset = get_preset(cfg.preset, **({"data_root": str(data_root)} if data_root is not None else {}))
    bench = benchmark if benchmark is not None else load_benchmark_for(preset, cfg.dataset)
    if cfg.num_tasks is not None:
        if cfg.num_tasks > bench.num_tasks:
            raise ConfigError(f"`num_tasks` {cfg.num_tasks}: {bench.name!r} has {bench.num_tasks} tasks")
        n = cfg.num_tasks
        bench = Benchmark(bench.name, bench.tasks[:n], bench.class_names[: bench.offsets[n]], bench.info)
    for task in bench.tasks:
        if len(task.train) == 0:
            raise ConfigError(f"task {task.index} of {bench.name!r} has no training data")
    theta0_model = backbone if backbone is not None else load_theta0(preset, cfg.checkpoint)
    theta0_model = theta0_model.to(device).eval().requires_grad_(False)
    names = tuned_weight_names(theta0_model)
    bench = cache_stem(bench, theta0_model, names)  # the frozen stem once per image, not once per step
    return bench, theta0_model, theta0_of(theta0_model), names


def follow(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    benchmark: Benchmark | None = None,
    backbone: nn.Module | None = None,
    runtime: Runtime | str | torch.device | None = None,
    data_root: str | Path | None = None,
) -> None:
    """The part of a ``torchrun`` rank other than 0 in :func:`run`: the same training, no file.

    It trains the same tasks in the same order as rank 0's :func:`run` (whose collectives it
    joins: DDP steps, ITA's shared modules), restores a resumed run from the files rank 0
    committed, and neither evaluates nor writes anything.
    """
    out = Path(out)
    runtime = Runtime.of(runtime)
    bench, theta0_model, theta0, names = _run_world(cfg, benchmark, backbone, runtime.device, data_root)
    committed = load_results(out) if resume and (out / "results.json").exists() else None
    done = len(committed["accuracy_matrix"]) if committed else 0
    method = get_method(cfg.method)
    ctx = TaskContext(method, cfg.finetune, cfg.method_cfg, bench, theta0_model, theta0, names,
                      progress=False, state_dir=out / "state", runtime=runtime)  # fmt: skip
    if done:
        pool = Pool.open(out / "pool")
        entries = pool.load_all(theta0_sha256=fingerprint(theta0_model), theta0=theta0)
        ctx.restore({t: e for t, e in entries.items() if t < done})
    ctx.state_dir = None  # rank 0 alone writes the state
    for t in method.tasks(bench):
        if t >= done:
            ctx.finish(method.train(ctx, t))


def _evaluate_after(ctx: TaskContext, entries: dict[int, PoolEntry], t: int) -> list:
    """Row t of the accuracy matrix: accuracy on the evaluated tasks of the composition after task t."""
    method = ctx.method
    seen = method.evaluated_tasks(ctx.bench, t)
    plan = plan_composition(sorted(entries), coefs=method.eval_coefs(len(entries)))
    model, head = method.compose(ctx.backbone, ctx.theta0, entries, plan)
    acc = evaluate_tasks(model, head, ctx.bench, seen, device=ctx.device)
    return [round(acc[s], 2) for s in seen]


def run_config(
    method: str,
    tuning: str = "lora",
    *,
    preset: str | None = None,
    dataset: str | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    ablation: str = "none",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    rank: int | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
    num_tasks: int | None = None,
    fisher_samples: int | None = None,
    curvature: str = "diag",
) -> RunConfig:
    """A run configuration from a preset's defaults (:func:`compolab.config.preset_configs`) plus
    explicit overrides (``compolab train``).

    Every value is validated here, before any data or weights are loaded.
    """
    p = get_preset(preset)
    ft, mc = preset_configs(p, get_method(method), dataset)
    ft = replace(ft, style=tuning, seed=seed)
    ft_changes = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "rank": rank}
    ft = replace(ft, **{k: v for k, v in ft_changes.items() if v is not None})
    mc_changes = {"alpha": alpha, "beta": beta, "fisher_samples": fisher_samples}
    mc = replace(mc, ablation=ablation, curvature=curvature,
                 **{k: v for k, v in mc_changes.items() if v is not None})  # fmt: skip
    return RunConfig(method=method, preset=p.name, dataset=dataset, finetune=ft, method_cfg=mc,
                     checkpoint=checkpoint, num_tasks=num_tasks)  # fmt: skip
