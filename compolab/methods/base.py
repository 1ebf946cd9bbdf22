"""What every method shares: its knobs, the :class:`Method` protocol and the :class:`TaskContext`.

A method is one object of the explicit table ``compolab.methods.METHODS``. The run driver
(:func:`compolab.run.run`) asks it which tasks it trains on, trains them one by one
(:meth:`Method.train`, then :meth:`Method.finish`), and evaluates after each task the composition
that :meth:`Method.compose` builds with :meth:`Method.eval_coefs`. Methods that keep something
across tasks (class statistics, Fishers) hold it in a typed state (``compolab.methods.state``),
saved after every task so that a killed run resumes (:meth:`Method.restore`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from compolab.data import Benchmark
from compolab.editing import CompositionPlan, compose_pool
from compolab.errors import ConfigError
from compolab.finetune import FinetuneConfig, FinetuneResult
from compolab.heads import IncrementalHead
from compolab.methods.state import MethodState
from compolab.pool import PoolEntry
from compolab.runtime import Runtime
from compolab.task_vector import TaskVector, uniform_coefs

__all__ = ["ABLATIONS", "CURVATURES", "MethodConfig", "Method", "MergedMethod", "TaskContext"]

#: ``none``; ``no-reg`` ("without Eq. 12 / 19": no backbone and no head penalty); ``cls-only``
#: ("reg only on CLS": the head penalty only).
ABLATIONS = ("none", "no-reg", "cls-only")
CURVATURES = ("diag", "kfac")  #: ``MethodConfig.curvature``: the paper's diagonal Fisher, or K-FAC


@dataclass(frozen=True)
class MethodConfig:
    """Knobs of the methods (defaults: neutral values; the presets' are in ``compolab.config``).

    Attributes:
        alpha: α of ITA's penalty (Eq. 11–12), ≥ 0.
        beta: β of IEL's penalty (Eq. 18–19), ≥ 0.
        ewc_lambda: strength of the EWC baseline's penalty, ≥ 0.
        ablation: One of :data:`ABLATIONS` (the paper's Table 2).
        pretune: Head pre-tuning (linear probe + classifier alignment, as the official code).
        req_weight_cls: Fisher-weighted head penalty; None = α (ITA) or β (IEL).
        simple_reg_weight_cls: Plain L2 head penalty.
        pretune_epochs: Linear-probe epochs of the pre-tuning.
        pretune_lr: Its SGD learning rate.
        align_epochs: Classifier-alignment epochs at task 0 (the paper adds 5 per task).
        align_samples: Synthetic features per class and alignment epoch.
        fisher_kind: ``exact``, ``mc`` or ``empirical`` (the paper: exact).
        fisher_top_k: Official ``fisher_mc_classes`` knob (None = all classes; exact only).
        fisher_samples: Training images of the task used for its Fisher (a seeded subset; None =
            all, as the paper). The Fisher is a mean per example, so a subset is an unbiased
            estimate of it; it bounds the cost of the exact Fisher, ≈ C backward passes per image.
        mc_samples: Labels drawn per image by the ``mc`` Fisher.
        decoupled: Apply the penalty as the paper's separate SGD step; None = the paper's choice
            (LoRA and (IA)³ decoupled, full fine-tuning coupled).
        curvature: The backbone penalty's Fisher at θ0, ``diag`` or ``kfac`` (:mod:`compolab.kfac`).
    """

    alpha: float = 1.0
    beta: float = 1.0
    ewc_lambda: float = 1.0
    ablation: str = "none"
    pretune: bool = True
    req_weight_cls: float | None = None
    simple_reg_weight_cls: float = 0.001
    pretune_epochs: int = 3
    pretune_lr: float = 0.01
    align_epochs: int = 10
    align_samples: int = 64
    fisher_kind: str = "exact"
    fisher_top_k: int | None = None
    fisher_samples: int | None = None
    mc_samples: int = 1
    decoupled: bool | None = None
    curvature: str = "diag"

    def __post_init__(self) -> None:
        for f in ("alpha", "beta", "ewc_lambda", "simple_reg_weight_cls", "pretune_lr"):
            value = getattr(self, f)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"MethodConfig `{f}` must be >= 0 and finite, got {value}")
        req = self.req_weight_cls
        if req is not None and not (math.isfinite(req) and req >= 0):
            raise ConfigError(f"MethodConfig `req_weight_cls` must be >= 0 and finite, got {req}")
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"`ablation` {self.ablation!r} is unknown; choose one of {list(ABLATIONS)}")
        for f in ("pretune_epochs", "align_epochs", "align_samples"):
            if getattr(self, f) < 0:
                raise ConfigError(f"MethodConfig `{f}` must be >= 0, got {getattr(self, f)}")
        if self.fisher_kind not in ("exact", "mc", "empirical"):
            raise ConfigError(f"unknown fisher_kind {self.fisher_kind!r}; choose exact, mc or empirical")
        if self.fisher_top_k is not None and (self.fisher_kind != "exact" or self.fisher_top_k <= 0):
            raise ConfigError("MethodConfig.fisher_top_k needs fisher_kind='exact' and a value > 0")
        for f in ("fisher_samples", "mc_samples"):
            value = getattr(self, f)
            if value is not None and value <= 0:
                raise ConfigError(f"MethodConfig `{f}` must be > 0, got {value}")
        if self.curvature not in CURVATURES:
            raise ConfigError(f"`curvature` {self.curvature!r} is unknown; choose one of {list(CURVATURES)}")

    def to_json(self) -> dict:
        """The fields; ``curvature`` only when not ``diag``: older configs and cache names are unchanged."""
        return {k: v for k, v in asdict(self).items() if (k, v) != ("curvature", "diag")}


@runtime_checkable
class Method(Protocol):
    """A class-incremental method, as the run driver, ``compolab compose`` and the probes see it.

    Attributes:
        name: Its key in ``METHODS`` (stored in the pool's manifest and in every card).
        linearised: True when the pool holds tangent components and the composition is the
            linearised model (TMC), not merged weights.
        preset_overrides: ``preset name -> {MethodConfig field: value}`` this method changes in
            that preset (the released IEL command pairs β with a milder head penalty).
        finetune_overrides: ``preset name -> {FinetuneConfig field: value}`` this method changes
            in that preset (TMC's schedule, chosen on the validation split).
        label: Its name in tables and figures.
        ablation_labels: ``ablation -> row label`` of the ablations it supports (the paper's
            Tables 2 and 6); empty when ``--ablation`` changes nothing.
        editable: True when its pool is one module per task composed with weights w_t, so that
            unlearning and specialization apply (not sequential fine-tuning or joint training).
    """

    name: str
    linearised: bool
    preset_overrides: Mapping[str, Mapping[str, object]]
    finetune_overrides: Mapping[str, Mapping[str, object]]
    label: str
    ablation_labels: Mapping[str, str]
    editable: bool

    def tasks(self, bench: Benchmark) -> list[int]:
        """The tasks it trains, in order (one module each)."""
        ...

    def evaluated_tasks(self, bench: Benchmark, t: int) -> list[int]:
        """The tasks whose test data row ``t`` of the accuracy matrix covers."""
        ...

    def eval_coefs(self, num_tasks: int) -> list[float]:
        """The composition weights :math:`w_t` at evaluation, for ``num_tasks`` modules."""
        ...

    def compose(
        self,
        backbone: nn.Module,
        theta0: Mapping[str, Tensor],
        entries: Mapping[int, PoolEntry],
        plan: CompositionPlan,
    ) -> tuple[nn.Module, IncrementalHead]:
        """The composed model of ``plan`` and the head over the composed tasks' classes."""
        ...

    def new_state(self) -> MethodState:
        """The empty state kept across tasks (None when the method keeps none)."""
        ...

    def train(self, ctx: TaskContext, t: int) -> PoolEntry:
        """Train task ``t``'s module and head."""
        ...

    def finish(self, ctx: TaskContext, entry: PoolEntry) -> None:
        """Update (and save) the state once task ``entry.task`` is trained and saved."""
        ...

    def restore(self, ctx: TaskContext, entries: Mapping[int, PoolEntry]) -> None:
        """Reload the state saved after the last of ``entries`` (a resumed run)."""
        ...


class MergedMethod:
    """Defaults of the methods whose modules are merged into one model: every task in order,
    evaluated on the tasks seen so far, composed as :math:`\\theta_0 + \\sum_t w_t \\tau_t`
    (:func:`~compolab.editing.compose_pool`) with :math:`w_t = 1/T`, no state."""

    name: str = ""
    linearised: bool = False
    preset_overrides: Mapping[str, Mapping[str, object]] = {}
    finetune_overrides: Mapping[str, Mapping[str, object]] = {}
    label: str = ""
    ablation_labels: Mapping[str, str] = {}
    editable: bool = False

    def tasks(self, bench: Benchmark) -> list[int]:
        return list(range(bench.num_tasks))

    def evaluated_tasks(self, bench: Benchmark, t: int) -> list[int]:
        return list(range(t + 1))

    def eval_coefs(self, num_tasks: int) -> list[float]:
        return uniform_coefs(num_tasks)

    def compose(
        self,
        backbone: nn.Module,
        theta0: Mapping[str, Tensor],
        entries: Mapping[int, PoolEntry],
        plan: CompositionPlan,
    ) -> tuple[nn.Module, IncrementalHead]:
        return compose_pool(backbone, theta0, entries, plan)

    def new_state(self) -> MethodState:
        return None

    def finish(self, ctx: TaskContext, entry: PoolEntry) -> None:
        return None

    def restore(self, ctx: TaskContext, entries: Mapping[int, PoolEntry]) -> None:
        return None

    def __repr__(self) -> str:
        return f"<method {self.name}>"


@dataclass
class TaskContext:
    """What a method needs across tasks: the benchmark, θ0, the finished modules and its state.

    Attributes:
        method: The method.
        finetune: Per-task fine-tuning hyper-parameters.
        cfg: The methods' knobs.
        bench: The benchmark.
        backbone: θ0's model (frozen).
        theta0: θ0's named parameters.
        names: Target weights of the modules.
        runtime: Device, autocast, physical batch, workers (:class:`~compolab.runtime.Runtime`), or
            a device (float32 there); default the CPU. Always a :class:`Runtime` once built.
        progress: Show progress bars.
        state_dir: Where the state is saved after each task (None: not saved).
        taus: :math:`\\tau_s` of the finished tasks.
        state: The method's state (:meth:`Method.new_state`).
        ahead: Tasks trained ahead of the driver (ITA's modules trained in parallel across ranks):
            ``t -> (entry, the state a sequential run has after t)``.
    """

    method: Method
    finetune: FinetuneConfig
    cfg: MethodConfig
    bench: Benchmark
    backbone: nn.Module
    theta0: dict[str, Tensor]
    names: list[str]
    runtime: Runtime | str | torch.device | None = None
    progress: bool | None = True
    state_dir: Path | None = None
    taus: dict[int, TaskVector] = field(default_factory=dict)
    state: MethodState = None
    ahead: dict[int, tuple[PoolEntry, MethodState]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.runtime = Runtime.of(self.runtime)
        if self.state is None:
            self.state = self.method.new_state()

    @property
    def device(self) -> torch.device:
        """The training device: ``runtime.device``."""
        return self.runtime.device

    def restore(self, entries: Mapping[int, PoolEntry]) -> None:
        """Rebuild τ_s and the state of the finished tasks (``--resume``)."""
        for t in sorted(entries):
            entries[t].module.to(self.device)
            entries[t].head.to(self.device)
            self.taus[t] = entries[t].module.delta(self.theta0).detach()
        if entries:
            self.method.restore(self, entries)

    def finish(self, entry: PoolEntry) -> None:
        """Record a finished task's module, then let the method update its state."""
        self.taus[entry.task] = entry.module.delta(self.theta0).detach()
        self.method.finish(self, entry)

    def offset(self, t: int) -> int:
        """First global label of task ``t``."""
        return self.bench.offsets[t]

    def seeded(self, t: int) -> FinetuneConfig:
        """Task ``t``'s fine-tuning config: its own seed (module init, batch order), from the run's."""
        return replace(self.finetune, seed=self.finetune.seed * 1000 + t)

    def entry(self, t: int, result: FinetuneResult, classes, **hparams) -> PoolEntry:
        """The pool entry of a trained task: module, head and card (method, hyper-parameters, metrics)."""
        card = {
            "classes": list(classes),
            "method": self.method.name,
            "hparams": {"finetune": self.finetune.__dict__, **hparams},
            "metrics": {"history": result.history, "seconds": round(result.seconds, 2)},
        }
        return PoolEntry(t, result.module, result.head, card)
