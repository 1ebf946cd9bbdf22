"""The argument parser of ``compolab``, and the flag of each library field.

Numbers are checked here (finite, in range) so that a bad one ends with one line before any work;
the rest is checked by the library, whose errors name fields that :func:`flags_of` maps to flags.
"""

from __future__ import annotations

import argparse
import math
import re

from compolab.cli import commands
from compolab.errors import ConfigError

__all__ = ["build_parser", "flags_of", "FIELD_FLAGS"]

DESCRIPTION = "The compolab command: world, pretrain, data, train, compose, probe, bench, reproduce."


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
    parser = _Parser(prog="compolab", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars")  # fmt: skip
    common.add_argument("--seed", type=_seed, default=0, help="random seed, 0 <= seed < 2**32")

    p = sub.add_parser("world", parents=[common], help="the tiny world: split, timing, probe")
    p.add_argument("--preset", default=None, help="tiny (default), paper or real-small")
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
    p.set_defaults(func=commands.cmd_world)

    p = sub.add_parser("pretrain", parents=[common], help="pre-train the tiny ViT (θ0 of tiny)")
    p.add_argument(
        "--out",
        default="runs/pretrain/tiny_vit",
        help="output path (.safetensors + .json); default runs/pretrain/tiny_vit",
    )
    p.add_argument("--steps", type=_positive(int), default=2400)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=commands.cmd_pretrain)

    p = sub.add_parser("data", parents=[common], help="describe a class-incremental benchmark")
    p.add_argument("--preset", default=None, help="tiny (default), paper or real-small")
    p.add_argument("--dataset", default=None, help="tiny, cifar100, imagenet-r, cub200, ...")
    p.add_argument("--root", default=None, help="folder of the real datasets ($COMPOLAB_DATA)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-100")
    p.set_defaults(func=commands.cmd_data)

    p = sub.add_parser("train", parents=[common], help="train a method on a class-incremental benchmark")
    p.add_argument("--method", required=True, help="ita, iel, seq, naive, ewc, joint or tmc")
    p.add_argument("--tuning", default="lora", help="full, lora or ia3")
    p.add_argument("--preset", default=None, help="tiny (default), paper or real-small")
    p.add_argument("--dataset", default=None, help="benchmark; default: the preset's")
    p.add_argument("--alpha", type=_non_negative, default=None, help="alpha of ITA (Eq. 11)")
    p.add_argument("--beta", type=_non_negative, default=None, help="beta of IEL (Eq. 18/19)")
    p.add_argument("--ablation", default="none", help="none, no-reg or cls-only")
    p.add_argument("--epochs", type=_positive(int), default=None)
    p.add_argument("--lr", type=_positive(float), default=None)
    p.add_argument("--batch-size", type=_positive(int), default=None)
    p.add_argument("--rank", type=_positive(int), default=None, help="LoRA rank r")
    p.add_argument("--out", required=True, help="run folder (pool/, results.json, log.txt)")
    p.add_argument("--save-stats", nargs="?", const="fisher,grams", default=None, metavar="KINDS",
                   help="also save the per-task statistics merges need (pool/stats/): fisher,grams "
                        "without a value, or e.g. fisher,grams,kfac")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--tasks", dest="num_tasks", type=_positive(int), default=None, metavar="N",
                   help="train only the first N tasks of the benchmark")  # fmt: skip
    p.add_argument("--checkpoint", default=None,
                   help="θ0 from this .safetensors (+ .json card) instead of the preset's")  # fmt: skip
    p.add_argument("--root", default=None, help="folder of the real datasets ($COMPOLAB_DATA)")
    p.add_argument("--fisher-samples", type=_positive(int), default=None, metavar="N",
                   help="ITA/IEL: the Fisher on a seeded subset of N images per task (default: the preset's)")
    p.add_argument("--curvature", default="diag",
                   help="ITA/IEL: the penalty's Fisher at θ0, diag (the paper's) or kfac")  # fmt: skip
    _runtime_flags(p, training=True)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("compose", parents=[common], help="compose / unlearn / specialize a pool")
    p.add_argument("--pool", required=True, help="pool folder (a run's pool/)")
    p.add_argument("--tasks", default=None, help="compose only these tasks, e.g. 0,2,3")
    p.add_argument("--drop", default=None, help="leave these tasks out (unlearning)")
    p.add_argument("--negate", default=None, help="subtract these tasks' modules (unlearning)")
    p.add_argument("--negate-coef", type=_finite, default=1.0, help="lambda of the negated tasks")
    p.add_argument("--weights", default=None, help="weights of the composed tasks, e.g. 0.5,0.5")
    p.add_argument("--eval", action="store_true", help="accuracy on the pool's benchmark")
    _runtime_flags(p)
    p.set_defaults(func=commands.cmd_compose)

    p = sub.add_parser("merge", parents=[common], help="merge a pool's modules (TIES, DARE, RegMean, ...)")
    p.add_argument("--pool", required=True, help="pool folder (a run's pool/; not TMC)")
    p.add_argument("--method", required=True, help="task-arithmetic, ties, dare, dare-ties, fisher, regmean, "
                   "kfac, tsv, iso-c or magmax")  # fmt: skip
    p.add_argument("--out", default=None, help="folder of the merged pool (new); default: write nothing")
    p.add_argument("--eval", action="store_true", help="test accuracy and second-order view of the choice")
    p.set_defaults(func=commands.cmd_merge)

    p = sub.add_parser("stats", parents=[common], help="per-task statistics of a pool that merges need")
    p.add_argument("--pool", required=True, help="pool folder (a run's pool/)")
    p.add_argument("--kind", default="fisher,grams",
                   help="comma-separated: fisher (Fisher merging), grams (RegMean), kfac (K-FAC merging)")
    p.add_argument("--fisher-images", type=_positive(int), default=100,
                   help="the Fisher and K-FAC on N training images per task (default 100)")  # fmt: skip
    p.set_defaults(func=commands.cmd_stats)

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
    q.add_argument("--second-order", default="fisher",
                   choices=["none", "fisher", "hessian", "diagonal", "kfac"],
                   help="overlay the quadratic prediction from θ0 with this curvature (diagonal: the run's "
                        "Fisher; kfac: K-FAC at θ0 on the probe images)")  # fmt: skip
    q.set_defaults(func=commands.cmd_probe)
    q = kinds.add_parser("plane", parents=[common, probe], help="loss on the plane θ0 + a·u + b·v")
    q.add_argument(
        "--span", nargs=2, type=_finite, default=[-0.5, 1.5], metavar=("LO", "HI"), help="a, b range"
    )
    q.add_argument("--steps", type=_positive(int), default=21, help="grid points per axis")
    q.add_argument("--random", type=int, default=0, choices=[0, 1, 2],
                   help="filter-normalised random directions (Li et al. 2018) for modules")  # fmt: skip
    q.set_defaults(func=commands.cmd_probe)
    q = kinds.add_parser("jensen", parents=[common, probe], help="composition gap vs Ω as modules are added")
    q.add_argument("--curvature", default="fisher", choices=["fisher", "all"],
                   help="Ω exact on the modules' span (+ the run's diagonal Fisher), or all: exact, "
                        "K-FAC and diagonal at θ0 on the probe images")  # fmt: skip
    q.set_defaults(func=commands.cmd_probe)

    p = sub.add_parser("bench", parents=[common], help="benchmarks (timings live here, not in tests)")
    p.add_argument("what", choices=["compose", "fisher", "tmc", "probe", "step", "explore"])
    p.add_argument("--preset", default="tiny", help="step: the backbone of tiny (default) or paper")
    p.add_argument("--batch-size", type=_positive(int), default=None, help="step: images per step")
    p.add_argument("--repeats", type=_positive(int), default=5, help="step: timed rounds (median)")
    _runtime_flags(p)
    p.set_defaults(func=commands.cmd_bench)

    p = sub.add_parser("reproduce", parents=[common],
                       help="every run, table (figures/tables) and figure; cached and resumable")  # fmt: skip
    p.add_argument("--preset", default=None, help="tiny (default), paper or real-small")
    p.add_argument("--seeds", type=_positive(int), default=3, help="seeds of the rows with asserted claims")
    p.add_argument("--out", default=None,
                   help="figures folder; tables go to <out>/tables (default: figures, figures/<preset> "
                        "for another preset)")  # fmt: skip
    p.add_argument("--cache", default=None,
                   help="run folders and cached measurements (default: runs/reproduce, "
                        "runs/reproduce-<preset> for another preset)")  # fmt: skip
    p.add_argument("--plan", action="store_true", help="list the jobs and their estimated cost; run nothing")
    p.add_argument("--workers", type=_positive(int), default=2, help="processes, one thread each")
    p.add_argument("--tasks", dest="num_tasks", type=_positive(int), default=None, metavar="N",
                   help="tasks per run (default: all; tiny: the 10 of tiny10)")  # fmt: skip
    p.add_argument("--epochs", type=_positive(int), default=None,
                   help="epochs per task (default: the preset's)")  # fmt: skip
    p.add_argument("--methods", default=None, help="methods of the grid, e.g. ita,iel (default: the tables')")
    p.add_argument("--styles", default=None, help="tuning styles of the grid, e.g. lora (default: all)")
    p.add_argument("--notebooks", default=None, help="notebooks folder (default: ./notebooks on tiny)")
    p.add_argument("--no-notebooks", action="store_true", help="make the tables only")
    p.add_argument("--no-merges", action="store_true", help="skip the merging tables (compolab merge)")
    p.add_argument("--no-kfac", action="store_true",
                   help="skip the rows trained with K-FAC curvature (they need curvlinops)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="training device: cpu (default), cuda or auto")
    p.set_defaults(func=commands.cmd_reproduce)
    return parser


#: Library fields set by a flag whose name is not the field's: a library error names the field
#: (``compolab.errors``), the command line says the flag. The others are read off the parser.


FIELD_FLAGS = {"style": "--tuning", "lambda_range": "--range", "curvature": "--second-order",
               "data_root": "--root", "coefs": "--weights"}  # fmt: skip


def flags_of(parser: argparse.ArgumentParser, command: str | None = None) -> dict[str, str]:
    """``field -> flag`` of every option of ``parser`` and its sub-commands (``num_tasks`` ->
    ``--tasks``), plus :data:`FIELD_FLAGS`; the options of sub-command ``command`` (the one that
    ran) win, so ``train``'s ``curvature`` is ``--curvature``, not ``probe``'s ``--second-order``."""
    flags: dict[str, str] = {}
    own: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags.update(flags_of(sub))
                if name == command:
                    own = {a.dest: max(a.option_strings, key=len) for a in sub._actions
                           if a.option_strings and a.dest != "help"}  # fmt: skip
        elif action.option_strings and action.dest != "help":
            flags.setdefault(action.dest, max(action.option_strings, key=len))
    return {**flags, **FIELD_FLAGS, **own}
