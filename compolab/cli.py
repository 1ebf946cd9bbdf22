"""The ``compolab`` command: ``world``, ``pretrain``, ``data``, ``train``, ``compose``, ``probe``, ``bench``,
``reproduce``.

Every bad input ends with one line ``compolab: error: ...`` on stderr and exit status 2, before
any work starts.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

from compolab.errors import CompolabError, ConfigError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like the kit's own; ``-1,0.5`` and ``-1e-3``
    are values, not options."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):  # noqa: D102
        raise ConfigError(message)


def _number(kind: type, *, low: float | None = None, strict: bool = True, high: float | None = None):
    """An argparse type: a finite ``kind`` above ``low`` (``strict``: ``> low``, else ``>= low``)
    and below ``high``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        if high is not None and value >= high:
            raise argparse.ArgumentTypeError(f"must be < {high}, got {text}")
        return value

    return parse


def _positive(kind: type):
    return _number(kind, low=0)


#: ``--seed``: what torch, numpy and the tiny world all accept.
_seed = _number(int, low=0, strict=False, high=2**32)
_finite = _number(float)
_non_negative = _number(float, low=0, strict=False)


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


# --------------------------------------------------------------------------- world


def _cmd_world(args: argparse.Namespace) -> None:
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


def _cmd_pretrain(args: argparse.Namespace) -> None:
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


def _cmd_data(args: argparse.Namespace) -> None:
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
    """The :class:`~compolab.distributed.Runtime` of ``--device`` / ``--precision`` / ... (checked
    first), joined to ``torchrun``'s process group when one runs this command."""
    from compolab.distributed import Runtime, init_distributed

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


def _cmd_train(args: argparse.Namespace) -> None:
    import os

    from compolab.distributed import current_world
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
    )
    if args.root:
        os.environ["COMPOLAB_DATA"] = args.root  # the preset's data root, for this run only
    runtime = _runtime(args)
    if not current_world().is_main:  # another torchrun rank: rank 0 writes and reports
        follow(cfg, args.out, resume=args.resume, runtime=runtime)
        _finish_ranks()
        return
    results = run(cfg, args.out, resume=args.resume, progress=args.progress, runtime=runtime)
    _finish_ranks()
    summary = {k: results[k] for k in ("final_accuracy", "accuracy_matrix", "task_seconds")}
    summary["out"] = str(args.out)
    summary["runtime"] = runtime.describe()
    _emit(summary, args.json)


# --------------------------------------------------------------------------- compose


def _cmd_compose(args: argparse.Namespace) -> None:
    from compolab.editing import compose_pool, plan_composition
    from compolab.evaluate import evaluate_tasks, final_average
    from compolab.methods import get_method
    from compolab.pool import Pool
    from compolab.run import open_pool_world

    pool = Pool.open(args.pool)
    if not pool.tasks():
        raise CompolabError(f"{pool.root} holds no module yet")
    method = pool.manifest.get("method")  # a hand-made pool names none: its modules are merged
    compose = get_method(method).compose if method is not None else compose_pool
    plan = plan_composition(
        pool.tasks(),
        tasks=_ids(args.tasks, "--tasks"),
        drop=_ids(args.drop, "--drop") or (),
        coefs=_floats(args.weights, "--weights"),
        negate=_ids(args.negate, "--negate") or (),
        negate_coef=args.negate_coef,
    )
    runtime = _runtime(args)
    backbone, theta0, bench = open_pool_world(pool, load_data=args.eval)
    backbone, theta0 = backbone.to(runtime.device), {n: v.to(runtime.device) for n, v in theta0.items()}
    sha = pool.manifest["theta0_sha256"]
    entries = {t: pool.load(t, theta0_sha256=sha, theta0=theta0) for t in plan.tasks + plan.negated}
    model, head = compose(backbone, theta0, entries, plan)  # TMC: the linearised model
    result: dict = {"composition": plan.describe(), "num_classes": len(head.global_labels)}
    if args.eval:
        with runtime.autocast_context():
            acc = evaluate_tasks(model, head, bench, plan.tasks, progress=args.progress,
                                 device=runtime.device)
        result["per_task_accuracy"] = {str(t): round(a, 2) for t, a in acc.items()}
        result["average_accuracy"] = round(final_average(acc), 2)
    _emit(result, args.json)


# --------------------------------------------------------------------------- probe


def _cmd_probe(args: argparse.Namespace) -> None:
    from compolab.probes.command import probe_pool

    if args.what == "interpolate":
        options = dict(lambda_range=tuple(args.range), steps=args.steps, composed=args.composed,
                       curvature=args.second_order)  # fmt: skip
    elif args.what == "plane":
        options = dict(span=tuple(args.span), steps=args.steps, random=args.random)
    else:
        options = {}
    runtime = _runtime(args)
    summary = probe_pool(args.what, args.pool, args.out, plot=args.plot, tasks=_ids(args.tasks, "--tasks"),
                         split=args.split, per_task=args.per_task, seed=args.seed, progress=args.progress,
                         device=runtime.device, **options)  # fmt: skip
    _finish_ranks()
    from compolab.distributed import current_world

    if current_world().is_main:
        _emit(summary, args.json)


# --------------------------------------------------------------------------- bench


def _cmd_bench(args: argparse.Namespace) -> None:
    from compolab import bench

    if args.what == "step":
        runtime = _runtime(args)
        _emit(bench.bench_step(preset=args.preset, runtime=runtime, batch_size=args.batch_size,
                               repeats=args.repeats), args.json)  # fmt: skip
        return
    if args.what == "explore":
        from compolab.explore.bench import bench_explore

        _emit(bench_explore(), args.json)
        return
    fn = {"compose": bench.bench_compose, "fisher": bench.bench_fisher, "tmc": bench.bench_tmc,
          "probe": bench.bench_probe}[args.what]  # fmt: skip
    _emit(fn(), args.json)


# --------------------------------------------------------------------------- reproduce


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from compolab.reproduce import ReproduceConfig, format_plan, plan, reproduce

    notebooks = args.notebooks
    if notebooks is None and args.preset in (None, "tiny") and Path("notebooks").is_dir():
        notebooks = "notebooks"  # the course notebooks run on the tiny preset only
    cfg = ReproduceConfig(
        **{k: v for k, v in (("preset", args.preset), ("methods", _names(args.methods)),
                             ("styles", _names(args.styles))) if v is not None},
        seeds=args.seeds, out=args.out, cache=args.cache, workers=args.workers,
        notebooks=None if args.no_notebooks else notebooks, num_tasks=args.num_tasks, epochs=args.epochs,
        device=args.device,
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


# --------------------------------------------------------------------------- main


def _runtime_flags(p: argparse.ArgumentParser, *, training: bool = False) -> None:
    """``--device`` and ``--precision`` (every computing command); loader and batch flags (training)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:K")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="bf16 autocast (default on CUDA) or fp32 (default on the CPU)")  # fmt: skip
    if training:
        p.add_argument("--physical-batch", type=_positive(int), default=None, metavar="B",
                       help="images per forward: a multiple of --batch-size dividing the optimiser "
                            "step (same gradient; default: the whole step on CUDA, the micro-batch "
                            "on the CPU)")  # fmt: skip
        p.add_argument("--workers", type=int, default=None,
                       help="loader workers per rank (default: up to 8 on CUDA, 0 on the CPU)")  # fmt: skip
        p.add_argument("--compile", action="store_true", help="torch.compile the training model")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``compolab`` command."""
    parser = _Parser(prog="compolab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars")  # fmt: skip
    common.add_argument("--seed", type=_seed, default=0, help="random seed, 0 <= seed < 2**32")

    p = sub.add_parser("world", parents=[common], help="the tiny world: split, timing, probe")
    p.add_argument("--preset", default=None, help="tiny (default) or paper")
    p.add_argument(
        "--probe",
        action="store_true",
        help="linear probe on the downstream classes: shipped vs random-init backbone",
    )
    p.add_argument("--checkpoint", default=None, help="probe this checkpoint instead of the shipped")
    p.add_argument(
        "--time",
        type=_positive(int),
        default=0,
        metavar="N",
        help="generate N pre-training images and report the speed",
    )
    p.add_argument("--size", type=_positive(int), default=32, help="image side in pixels")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("pretrain", parents=[common], help="pre-train the tiny ViT (θ0 of tiny)")
    p.add_argument(
        "--out",
        default="runs/pretrain/tiny_vit",
        help="output path (.safetensors + .json); default runs/pretrain/tiny_vit",
    )
    p.add_argument("--steps", type=_positive(int), default=2400)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("data", parents=[common], help="describe a class-incremental benchmark")
    p.add_argument("--preset", default=None, help="tiny (default) or paper")
    p.add_argument("--dataset", default=None, help="tiny, cifar100, imagenet-r, cub200, ...")
    p.add_argument("--root", default=None, help="folder of the real datasets ($COMPOLAB_DATA)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-100")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("train", parents=[common], help="train a method on a class-incremental benchmark")
    p.add_argument("--method", required=True, help="ita, iel, seq, naive, ewc, joint or tmc")
    p.add_argument("--tuning", default="lora", help="full, lora or ia3")
    p.add_argument("--preset", default=None, help="tiny (default) or paper")
    p.add_argument("--dataset", default=None, help="benchmark; default: the preset's")
    p.add_argument("--alpha", type=_non_negative, default=None, help="alpha of ITA (Eq. 11)")
    p.add_argument("--beta", type=_non_negative, default=None, help="beta of IEL (Eq. 18/19)")
    p.add_argument("--ablation", default="none", help="none, no-reg or cls-only")
    p.add_argument("--epochs", type=_positive(int), default=None)
    p.add_argument("--lr", type=_positive(float), default=None)
    p.add_argument("--batch-size", type=_positive(int), default=None)
    p.add_argument("--rank", type=_positive(int), default=None, help="LoRA rank r")
    p.add_argument("--out", required=True, help="run folder (pool/, results.json, log.txt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--tasks", dest="num_tasks", type=_positive(int), default=None, metavar="N",
                   help="train only the first N tasks of the benchmark")  # fmt: skip
    p.add_argument("--checkpoint", default=None,
                   help="θ0 from this .safetensors (+ .json card) instead of the preset's")  # fmt: skip
    p.add_argument("--root", default=None, help="folder of the real datasets ($COMPOLAB_DATA)")
    p.add_argument("--fisher-samples", type=_positive(int), default=None, metavar="N",
                   help="ITA/IEL: the Fisher on a seeded subset of N images per task (default: the preset's)")
    _runtime_flags(p, training=True)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compose", parents=[common], help="compose / unlearn / specialize a pool")
    p.add_argument("--pool", required=True, help="pool folder (a run's pool/)")
    p.add_argument("--tasks", default=None, help="compose only these tasks, e.g. 0,2,3")
    p.add_argument("--drop", default=None, help="leave these tasks out (unlearning)")
    p.add_argument("--negate", default=None, help="subtract these tasks' modules (unlearning)")
    p.add_argument("--negate-coef", type=_finite, default=1.0, help="lambda of the negated tasks")
    p.add_argument("--weights", default=None, help="weights of the composed tasks, e.g. 0.5,0.5")
    p.add_argument("--eval", action="store_true", help="accuracy on the pool's benchmark")
    _runtime_flags(p)
    p.set_defaults(func=_cmd_compose)

    p = sub.add_parser("probe", help="loss-landscape / basin probes of a pool (figures + JSON)")
    kinds = p.add_subparsers(dest="what", parser_class=_Parser, required=True)
    probe = _Parser(add_help=False)
    probe.add_argument("--pool", required=True, help="pool folder (a run's pool/)")
    probe.add_argument("--tasks", default=None, help="modules to probe, e.g. 0,2 (default: all)")
    probe.add_argument("--split", default="train", choices=["train", "val", "test"], help="probe images")
    probe.add_argument("--per-task", type=_positive(int), default=50, help="probe images per task")
    probe.add_argument("--out", required=True, help="results file (.json)")
    probe.add_argument("--plot", default=None, help="figure file (.png, .pdf or .svg)")
    probe.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:K")
    q = kinds.add_parser("interpolate", parents=[common, probe], help="loss along θ0 + λτ for each module")
    q.add_argument("--range", nargs=2, type=_finite, default=[-0.5, 2.0], metavar=("LO", "HI"),
                   help="λ range")  # fmt: skip
    q.add_argument("--steps", type=_positive(int), default=41, help="λ values")
    q.add_argument("--composed", action="store_true", help="also the path to the composition θ0 + λ·mean τ")
    q.add_argument("--second-order", default="fisher", choices=["none", "fisher", "hessian", "diagonal"],
                   help="overlay the quadratic prediction from θ0 with this curvature")  # fmt: skip
    q.set_defaults(func=_cmd_probe)
    q = kinds.add_parser("plane", parents=[common, probe], help="loss on the plane θ0 + a·u + b·v")
    q.add_argument(
        "--span", nargs=2, type=_finite, default=[-0.5, 1.5], metavar=("LO", "HI"), help="a, b range"
    )
    q.add_argument("--steps", type=_positive(int), default=21, help="grid points per axis")
    q.add_argument("--random", type=int, default=0, choices=[0, 1, 2],
                   help="filter-normalised random directions (Li et al. 2018) for modules")  # fmt: skip
    q.set_defaults(func=_cmd_probe)
    q = kinds.add_parser("jensen", parents=[common, probe], help="composition gap vs Ω as modules are added")
    q.set_defaults(func=_cmd_probe)

    p = sub.add_parser("bench", parents=[common], help="benchmarks (timings live here, not in tests)")
    p.add_argument("what", choices=["compose", "fisher", "tmc", "probe", "step", "explore"])
    p.add_argument("--preset", default="tiny", help="step: the backbone of tiny (default) or paper")
    p.add_argument("--batch-size", type=_positive(int), default=None, help="step: images per step")
    p.add_argument("--repeats", type=_positive(int), default=5, help="step: timed rounds (median)")
    _runtime_flags(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("reproduce", parents=[common],
                       help="every run, table (figures/tables) and figure; cached and resumable")  # fmt: skip
    p.add_argument("--preset", default=None, help="tiny (default) or paper")
    p.add_argument("--seeds", type=_positive(int), default=3, help="seeds of the rows with asserted claims")
    p.add_argument("--out", default="figures", help="figures folder; tables go to <out>/tables")
    p.add_argument("--cache", default="runs/reproduce", help="run folders and cached measurements")
    p.add_argument("--plan", action="store_true", help="list the jobs and their estimated cost; run nothing")
    p.add_argument("--workers", type=_positive(int), default=2, help="processes, one thread each")
    p.add_argument("--tasks", dest="num_tasks", type=_positive(int), default=None, metavar="N",
                   help="tasks per run (default: 3 on tiny, all on paper)")  # fmt: skip
    p.add_argument("--epochs", type=_positive(int), default=None,
                   help="epochs per task (default: the preset's)")  # fmt: skip
    p.add_argument("--methods", default=None, help="methods of the grid, e.g. ita,iel (default: the tables')")
    p.add_argument("--styles", default=None, help="tuning styles of the grid, e.g. lora (default: all)")
    p.add_argument("--notebooks", default=None, help="notebooks folder (default: ./notebooks on tiny)")
    p.add_argument("--no-notebooks", action="store_true", help="make the tables only")
    p.add_argument("--device", default="cpu", help="training device: cpu (default), cuda or auto")
    p.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except CompolabError as e:
        print(f"compolab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compolab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
