"""A class-incremental run: train one module per task, save the pool, evaluate the composition.

``compolab train`` calls :func:`run`. The output folder holds::

    config.json    the run's configuration (a resumed run must match it exactly)
    pool/          the module pool (``compolab.pool``): one safetensors + JSON card per task
    results.json   final_accuracy (%), accuracy_matrix, composed_accuracy, task_seconds, wall_seconds, config
    log.txt        one line per event

Results are rewritten after every task, so a killed run keeps every finished task, and
``resume=True`` starts again at the first unfinished one. A NaN / infinite loss stops the run
with :class:`~compolab.errors.TrainingDiverged`; the modules already saved stay valid.

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
from compolab.errors import CompolabError, ConfigError
from compolab.evaluate import evaluate_tasks
from compolab.finetune import FinetuneConfig
from compolab.io import write_json
from compolab.methods import DEFAULT_METHOD, MethodConfig, TaskContext, get_method
from compolab.models import fingerprint, theta0_of, tuned_weight_names
from compolab.pool import Pool, PoolEntry

__all__ = ["RunConfig", "run_config", "run", "load_results", "open_pool_world"]


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (stored in ``config.json``).

    Attributes:
        method: A name of ``compolab.methods.METHODS``.
        preset: ``tiny`` or ``paper``.
        dataset: Benchmark name; default: the preset's.
        finetune: Per-task fine-tuning hyper-parameters (style, epochs, lr, ...).
        method_cfg: The method's own knobs (α, β, ablation, head pipeline).
        checkpoint: θ0 checkpoint (tiny preset); default: the shipped one.
    """

    method: str = DEFAULT_METHOD
    preset: str = "tiny"
    dataset: str | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    method_cfg: MethodConfig = field(default_factory=MethodConfig)
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        get_method(self.method)  # validates the name
        get_preset(self.preset)  # validates the name

    def to_json(self) -> dict:
        return asdict(self)

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


def load_results(out: str | Path) -> dict:
    """The ``results.json`` of a run folder."""
    path = Path(out) / "results.json"
    if not path.exists():
        raise CompolabError(f"{path} not found: no run in {out}")
    return json.loads(path.read_text())


def _check_resume(out: Path, cfg: RunConfig, resume: bool) -> dict | None:
    """Validate the output folder before any work; returns the previous results when resuming."""
    cfg_path = out / "config.json"
    if not resume:
        if cfg_path.exists():
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or another --out")
        return None
    if not cfg_path.exists():
        raise ConfigError(f"--resume: {out} holds no run (no config.json)")
    previous = json.loads(cfg_path.read_text())
    current = json.loads(json.dumps(cfg.to_json()))
    if previous != current:
        diff = _diff_fields(previous, current)
        raise ConfigError(f"--resume: {out} was made with another config (fields differ: {diff})")
    return load_results(out) if (out / "results.json").exists() else None


def _diff_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two nested config dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff_fields(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def run(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = True,
    benchmark: Benchmark | None = None,
    backbone: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train ``cfg.method`` on every task of the benchmark; returns the results dict.

    Args:
        cfg: The run configuration.
        out: Output folder (created).
        resume: Continue a run in ``out`` with the same config, at its first unfinished task.
        progress: Show progress bars.
        benchmark: Use this benchmark instead of the preset's (tests, notebooks).
        backbone: Use this θ0 instead of the preset's.
        device: Training device.

    Raises:
        ConfigError: Before any training, for a bad config, an empty task, or a ``resume``
            that does not match.
        TrainingDiverged: If a loss becomes NaN / infinite (finished tasks stay saved).
    """
    out = Path(out)
    previous = _check_resume(out, cfg, resume)
    preset = get_preset(cfg.preset)
    bench = benchmark if benchmark is not None else load_benchmark_for(preset, cfg.dataset)
    for task in bench.tasks:
        if len(task.train) == 0:
            raise ConfigError(f"task {task.index} of {bench.name!r} has no training data")
    theta0_model = backbone if backbone is not None else load_theta0(preset, cfg.checkpoint)
    theta0_model = theta0_model.to(device).eval().requires_grad_(False)
    theta0 = theta0_of(theta0_model)
    names = tuned_weight_names(theta0_model)
    sha = fingerprint(theta0_model)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg.to_json())
    pool = Pool.create(out / "pool", theta0_sha256=sha, benchmark={"name": bench.name, **bench.info},
                       preset=cfg.preset, checkpoint=cfg.checkpoint, method=cfg.method)  # fmt: skip
    results = previous or {
        "config": cfg.to_json(), "benchmark": bench.name, "num_tasks": bench.num_tasks,
        "accuracy_matrix": [], "composed_accuracy": [], "task_seconds": [], "final_accuracy": None,
        "wall_seconds": 0.0,
    }  # fmt: skip
    wall_before, t_start = results.get("wall_seconds", 0.0), time.time()
    done = len(results["accuracy_matrix"])
    log = open(out / "log.txt", "a")  # noqa: SIM115 - kept open for the whole run
    method = get_method(cfg.method)
    ctx = TaskContext(method, cfg.finetune, cfg.method_cfg, bench, theta0_model, theta0, names,
                      device=device, progress=progress, state_dir=out / "state")  # fmt: skip
    entries = pool.load_all(theta0_sha256=sha) if done else {}
    entries = {t: e for t, e in entries.items() if t < done}
    ctx.restore(entries)
    for t in method.tasks(bench):
        if t < done:
            continue
        t0 = time.time()
        log.write(f"{time.strftime('%H:%M:%S')} task {t}: training ({cfg.method}, {cfg.finetune.style})\n")
        log.flush()
        entry = method.train(ctx, t)
        pool.save(entry)
        entries[t] = entry
        ctx.finish(entry)
        seconds = time.time() - t0
        row = _evaluate_after(ctx, entries, t)
        results["accuracy_matrix"].append(row)
        results["composed_accuracy"].append(round(sum(row) / len(row), 2))
        results["task_seconds"].append(round(seconds, 2))
        log.write(f"{time.strftime('%H:%M:%S')} task {t}: {seconds:.1f}s, accuracy {row}\n")
        log.flush()
        results["wall_seconds"] = round(wall_before + time.time() - t_start, 1)
        write_json(out / "results.json", results)
    last = results["accuracy_matrix"][-1]
    results["final_accuracy"] = round(sum(last) / len(last), 2)
    results["wall_seconds"] = round(wall_before + time.time() - t_start, 1)
    write_json(out / "results.json", results)
    log.close()
    return results


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
    mc_changes = {"alpha": alpha, "beta": beta}
    mc = replace(mc, ablation=ablation, **{k: v for k, v in mc_changes.items() if v is not None})
    return RunConfig(method=method, preset=p.name, dataset=dataset, finetune=ft, method_cfg=mc,
                     checkpoint=checkpoint)  # fmt: skip


def open_pool_world(pool: Pool, *, load_data: bool = True) -> tuple[nn.Module, dict, Benchmark | None]:
    """θ0 and the benchmark a pool was trained on, from its manifest (``compolab compose``).

    Raises:
        CompolabError: If the backbone in use is not the pool's θ0.
    """
    from compolab.data import TinyWorldConfig, tiny_benchmark

    m = pool.manifest
    preset = get_preset(m.get("preset", "tiny"))
    backbone = load_theta0(preset, m.get("checkpoint")).eval().requires_grad_(False)
    if fingerprint(backbone) != m["theta0_sha256"]:
        raise CompolabError(f"{pool.root} was trained from another backbone than {preset.name}'s θ0")
    bench = None
    if load_data:
        info = m.get("benchmark", {})
        if info.get("name") == "tiny":
            bench = tiny_benchmark(TinyWorldConfig(**info["config"]))
        else:
            bench = load_benchmark_for(preset, info.get("name"))
    return backbone, theta0_of(backbone), bench
