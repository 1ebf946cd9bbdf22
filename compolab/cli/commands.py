"""The sub-commands of ``compolab``: each calls the library and prints its summary.

Every function takes the :class:`argparse.Namespace` of :func:`compolab.cli.parser.build_parser`.
The library does the work and names bad fields; :func:`compolab.cli.main` prints its errors.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from compolab.errors import CompolabError, ConfigError

__all__ = [
    "cmd_world", "cmd_pretrain", "cmd_data", "cmd_train",
    "cmd_compose", "cmd_merge", "cmd_stats", "cmd_probe", "cmd_bench", "cmd_reproduce",
]  # fmt: skip


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


# --------------------------------------------------------------------------- world


def cmd_world(args: argparse.Namespace) -> None:
    from compolab.config import get_preset
    from compolab.world import world_split

    preset = get_preset(args.preset)
    if preset.name != "tiny":
        raise ConfigError("`compolab world` is the tiny preset's data; use `compolab data` for paper")
    split = world_split(seed=args.seed)
    result: dict = {
        "pretrain_classes": len(split.pretrain),
        "downstream_classes": len(split.downstream),
    }
    if args.time:
        from compolab.world import generate

        t0 = time.perf_counter()
        generate(split.pretrain, args.time, seed=args.seed, size=args.size)
        seconds = time.perf_counter() - t0
        result.update(generated=args.time, seconds=round(seconds, 2),
                      images_per_s=round(args.time / seconds))  # fmt: skip
    if args.probe:
        import torch

        from compolab.linear_probe import probe_accuracy
        from compolab.models import BackboneSpec, load_backbone, make_backbone
        from compolab.pretrain import probe_datasets

        shipped, card = load_backbone(args.checkpoint)
        train, test, n_cls = probe_datasets(args.seed, shipped.patch_embed.img_size[0])
        torch.manual_seed(args.seed)
        random_init = make_backbone(BackboneSpec(**card["backbone"]))
        acc_shipped = probe_accuracy(shipped, train, test, n_cls, progress=args.progress)
        acc_random = probe_accuracy(random_init, train, test, n_cls, progress=args.progress)
        result.update(shipped=round(acc_shipped, 2), random_init=round(acc_random, 2),
                      gap=round(acc_shipped - acc_random, 2), num_classes=n_cls,
                      checkpoint=str(args.checkpoint or "shipped"))  # fmt: skip
    _emit(result, args.json)


# --------------------------------------------------------------------------- pretrain


def cmd_pretrain(args: argparse.Namespace) -> None:
    from compolab.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(steps=args.steps, seed=args.seed)
    out = Path(args.out).with_suffix(".safetensors")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it or choose another --out")
    _, card = pretrain(cfg, out=out, probe=True, progress=args.progress)
    result = {k: v for k, v in card.items() if k not in ("history", "pretrain")}
    result["out"] = str(out)
    _emit(result, args.json)


# --------------------------------------------------------------------------- data


def cmd_data(args: argparse.Namespace) -> None:
    from compolab.config import get_preset, load_benchmark_for

    overrides = {"data_root": args.root} if args.root else {}
    preset = get_preset(args.preset, **overrides)
    bench = load_benchmark_for(preset, args.dataset, download=args.download)
    result = {
        "name": bench.name,
        "num_tasks": bench.num_tasks,
        "num_classes": bench.num_classes,
        "offsets": bench.offsets,
        "train_sizes": [len(t.train) for t in bench.tasks],
        "test_sizes": [len(t.test) for t in bench.tasks],
    }
    _emit(result, args.json)


# --------------------------------------------------------------------------- train


def _ids(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated task ids like 0,2,3; got {text!r}") from None


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated numbers like 0.5,0.5; got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{flag} expects finite numbers; got {text!r}")
    return values


def _runtime(args: argparse.Namespace):
    """The :class:`~compolab.runtime.Runtime` of ``--device`` / ``--precision`` / ... (checked
    first), joined to ``torchrun``'s process group when one runs this command."""
    from compolab.distributed import init_distributed
    from compolab.runtime import Runtime

    runtime = Runtime.resolve(args.device, getattr(args, "precision", None),
                              physical_batch=getattr(args, "physical_batch", None),
                              workers=getattr(args, "workers", None),
                              compile=getattr(args, "compile", False))  # fmt: skip
    init_distributed(runtime.device)
    return runtime


def _finish_ranks() -> None:
    """Wait for every ``torchrun`` rank, then leave the process group."""
    import torch.distributed as dist

    from compolab.distributed import barrier

    barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_train(args: argparse.Namespace) -> None:
    from compolab.distributed import current_world
    from compolab.methods import get_method
    from compolab.run import follow, run, run_config

    cfg = run_config(
        args.method,
        args.tuning,
        preset=args.preset,
        dataset=args.dataset,
        alpha=args.alpha,
        beta=args.beta,
        ablation=args.ablation,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        rank=args.rank,
        seed=args.seed,
        checkpoint=args.checkpoint,
        num_tasks=args.num_tasks,
        fisher_samples=args.fisher_samples,
        curvature=args.curvature,
    )
    runtime = _runtime(args)
    kinds = _stat_kinds(args.save_stats, "--save-stats") if args.save_stats is not None else None
    if args.save_stats and get_method(cfg.method).linearised:
        raise ConfigError("--save-stats: a TMC pool holds tangents, not weights; it has no merge statistics")
    if not current_world().is_main:  # another torchrun rank: rank 0 writes and reports
        follow(cfg, args.out, resume=args.resume, runtime=runtime, data_root=args.root)
        _finish_ranks()
        return
    results = run(cfg, args.out, resume=args.resume, progress=args.progress, runtime=runtime,
                  data_root=args.root)  # fmt: skip
    _finish_ranks()
    summary = {k: results[k] for k in ("final_accuracy", "accuracy_matrix", "task_seconds")}
    if args.save_stats:  # what Fisher merging, RegMean and K-FAC merging read (compolab merge)
        from compolab.pool_stats import save_pool_statistics
        from compolab.workspace import open_pool

        opened = open_pool(Path(args.out) / "pool", runtime=runtime)
        saved = save_pool_statistics(opened, kinds, fisher_images=100, progress=args.progress)  # as `stats`
        summary["stats"] = [str(p) for p in saved]
    summary["out"] = str(args.out)
    summary["runtime"] = runtime.describe()
    _emit(summary, args.json)


# --------------------------------------------------------------------------- compose


def cmd_compose(args: argparse.Namespace) -> None:
    from compolab.editing import plan_composition
    from compolab.pool import Pool
    from compolab.workspace import compose_and_evaluate, open_pool

    pool = Pool.open(args.pool)
    if not pool.tasks():
        raise CompolabError(f"{pool.root} holds no module yet")
    plan = plan_composition(
        pool.tasks(),
        tasks=_ids(args.tasks, "--tasks"),
        drop=_ids(args.drop, "--drop") or (),
        coefs=_floats(args.weights, "--weights"),
        negate=_ids(args.negate, "--negate") or (),
        negate_coef=args.negate_coef,
    )
    opened = open_pool(pool, tasks=plan.tasks + plan.negated, load_data=args.eval, runtime=_runtime(args))
    _emit(compose_and_evaluate(opened, plan, evaluate=args.eval, progress=args.progress), args.json)


# --------------------------------------------------------------------------- merge, stats


def cmd_merge(args: argparse.Namespace) -> None:
    from compolab.merge_pool import merge_pool

    result = merge_pool(args.pool, args.method, args.out, evaluate=args.eval, lens=args.eval,
                        progress=args.progress)  # fmt: skip
    _emit(result, args.json)


def _stat_kinds(text: str, flag: str) -> list[str]:
    """The statistics kinds of a comma-separated flag value, checked before any work."""
    from compolab.pool_stats import STAT_KINDS

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in STAT_KINDS]
    if bad or not kinds:
        raise ConfigError(f"{flag} {text!r}: choose from {', '.join(STAT_KINDS)} (comma-separated)")
    return kinds


def cmd_stats(args: argparse.Namespace) -> None:
    from compolab.pool_stats import save_pool_statistics
    from compolab.workspace import open_pool

    kinds = _stat_kinds(args.kind, "--kind")
    paths = save_pool_statistics(open_pool(args.pool), kinds, fisher_images=args.fisher_images,
                                 progress=args.progress)  # fmt: skip
    _emit({"pool": args.pool, "kinds": kinds, "files": [str(p) for p in paths]}, args.json)


# --------------------------------------------------------------------------- probe


def cmd_probe(args: argparse.Namespace) -> None:
    from compolab.probes.command import probe_pool

    if args.what == "interpolate":
        options = dict(lambda_range=tuple(args.range), steps=args.steps, composed=args.composed,
                       curvature=args.second_order)  # fmt: skip
    elif args.what == "plane":
        options = dict(span=tuple(args.span), steps=args.steps, random=args.random)
    else:
        options = dict(curvature=args.curvature)
    runtime = _runtime(args)
    summary = probe_pool(args.what, args.pool, args.out, plot=args.plot, tasks=_ids(args.tasks, "--tasks"),
                         split=args.split, per_task=args.per_task, seed=args.seed, progress=args.progress,
                         device=runtime.device, **options)  # fmt: skip
    _finish_ranks()
    from compolab.distributed import current_world

    if current_world().is_main:
        _emit(summary, args.json)


# --------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> None:
    from compolab import bench

    if args.what == "step":
        runtime = _runtime(args)
        _emit(bench.bench_step(preset=args.preset, runtime=runtime, batch_size=args.batch_size,
                               repeats=args.repeats), args.json)  # fmt: skip
        return
    fn = {"compose": bench.bench_compose, "fisher": bench.bench_fisher, "tmc": bench.bench_tmc,
          "probe": bench.bench_probe, "explore": bench.bench_explore}[args.what]  # fmt: skip
    _emit(fn(), args.json)


# --------------------------------------------------------------------------- reproduce


def cmd_reproduce(args: argparse.Namespace) -> None:
    from compolab.reproduce import ReproduceConfig, format_plan, plan, reproduce

    notebooks = args.notebooks
    if notebooks is None and args.preset in (None, "tiny") and Path("notebooks").is_dir():
        notebooks = "notebooks"  # the course notebooks run on the tiny preset only
    cfg = ReproduceConfig(  # a flag not given leaves the preset's default (ReproduceConfig)
        **{k: v for k, v in (("preset", args.preset), ("methods", _names(args.methods)),
                             ("styles", _names(args.styles))) if v is not None},
        seeds=args.seeds, out=args.out, cache=args.cache, workers=args.workers,
        notebooks=None if args.no_notebooks else notebooks, num_tasks=args.num_tasks, epochs=args.epochs,
        device=args.device, merges=False if args.no_merges else None, kfac=False if args.no_kfac else None,
    )  # fmt: skip
    if args.plan:
        jobs = plan(cfg)
        if args.json:
            print(json.dumps([{"name": j.name, "kind": j.kind, "status": j.status, "cost": j.cost}
                              for j in jobs]))  # fmt: skip
        else:
            print(format_plan(jobs, cfg.workers))
        return
    _emit(reproduce(cfg, progress=args.progress), args.json)


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())
