"""Benchmarks (``compolab bench compose|fisher|tmc|probe|step``): timing goals live here, never in tests.

**compose** — :func:`bench_compose`: inference cost of a composed model of T = 1 and T = 10 modules
(one merged model: the same cost), of an output ensemble of 10 models (10 forwards), and of one
IEL training step with 1 and 10 frozen modules (pre-merged: the same cost).

**fisher** — exact diagonal Fisher against the official per-class backward loop.

**tmc** — :func:`bench_tmc`: one linearised forward vs one plain forward; a 10-component TMC
composition vs a 10-model output ensemble.

**probe** — :func:`bench_probe`: one 41-point basin-probe curve: one point per forward, vmapped, a plain loop.

**step** — :func:`bench_step`: images/s of a plain LoRA step, an ITA step and an IEL step (same model,
batch, device, precision), of the Fisher, and MFU against the device's bf16 peak when known.

:func:`bench_fisher` builds one model (the tiny preset's ViT shape, random init, an
``IncrementalHead``) and one batch, then times in the same process, round-robin:

* the kit's exact Fisher (:func:`compolab.fisher.diagonal_fisher`: batched backward over classes);
* the official code's method: all parameters frozen, the input multiplied by a dummy
  ``requires_grad`` scalar so that ``register_full_backward_hook`` fires, and one
  ``backward(retain_graph=True)`` per class of :math:`\\sum_n \\sqrt{p_c}\\,\\log p_c`;
* the approximations (top-k classes, Monte Carlo with 1 and 10 labels, empirical), with their
  relative error to the exact Fisher.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from compolab.distributed import Runtime, peak_flops
from compolab.fisher import diagonal_fisher
from compolab.heads import IncrementalHead, new_head
from compolab.models import TINY_VIT, BackboneSpec, make_backbone, theta0_of, tuned_weight_names
from compolab.tuning import TaskModule

__all__ = ["bench_compose", "bench_fisher", "bench_probe", "bench_step", "bench_tmc", "official_loop_fisher"]


def official_loop_fisher(
    backbone: nn.Module, head: nn.Module, x: Tensor, names: list[str]
) -> dict[str, Tensor]:
    """The official code's exact Fisher of one batch: one backward per class, full backward hooks.

    A plain transcription of ``__compute_fisher_hooks``, kept as the speed baseline.

    Args:
        backbone: Maps ``x`` to features; ``names`` are ``nn.Linear`` weights of it.
        head: Features to logits.
        x: One batch.
        names: The Linear weights to compute.

    Returns:
        ``name -> (out, in)``: :math:`\\sum_n \\sum_c p_c (\\nabla \\log p_c)^2`.
    """
    modules = {n: backbone.get_submodule(n.rsplit(".", 1)[0]) for n in names}
    inputs: dict[str, Tensor] = {}
    fisher = {n: torch.zeros_like(m.weight) for n, m in modules.items()}

    def forward_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            inputs[name] = args[0].detach()
        return hook

    def backward_hook(name: str):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            delta, a = grad_output[0], inputs[name]
            if a.ndim == 2:  # one token: (δ²)ᵀ(a²)
                fisher[name] += delta.square().T @ a.square()
            else:  # per-sample gradient sums over tokens, then squared
                fisher[name] += torch.einsum("bto,bti->boi", delta, a).square().sum(0)
        return hook

    frozen = [(p, p.requires_grad) for p in [*backbone.parameters(), *head.parameters()]]
    handles = []
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for n, m in modules.items():
            handles.append(m.register_forward_hook(forward_hook(n)))
            handles.append(m.register_full_backward_hook(backward_hook(n)))
        dummy = torch.ones((), dtype=x.dtype, device=x.device, requires_grad=True)
        log_p = torch.log_softmax(head(backbone(x * dummy)), dim=-1)
        p = log_p.detach().exp()
        for c in range(log_p.shape[1]):
            (p[:, c].sqrt() * log_p[:, c]).sum().backward(retain_graph=True)
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return fisher


def _rel_err(approx: dict[str, Tensor], exact: dict[str, Tensor]) -> float:
    """Relative L2 error over all entries together."""
    num = sum(float((approx[k].double() - exact[k].double()).square().sum()) for k in exact)
    den = sum(float(exact[k].double().square().sum()) for k in exact)
    return (num / den) ** 0.5


def _max_tensor_rel_err(approx: dict[str, Tensor], exact: dict[str, Tensor]) -> float:
    """Largest relative L2 error of any one tensor."""
    return max(float((approx[k] - exact[k]).double().norm() / exact[k].double().norm()) for k in exact)


def _timed(fn: Callable[[], dict[str, Tensor]], device: torch.device) -> tuple[float, dict[str, Tensor]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def bench_fisher(
    *,
    batch_size: int = 8,
    num_classes: int = 50,
    classes_per_task: int = 10,
    device: str | torch.device = "cpu",
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
    spec: BackboneSpec = TINY_VIT,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Time the kit's exact Fisher against the official per-class loop on the same model and batch.

    Args:
        batch_size: Images per batch (the official micro-batch is 8).
        num_classes: Classes of the head (softmax over all of them).
        classes_per_task: Width of each task head of the ``IncrementalHead``.
        device: Where to run.
        repeats: Timed runs of each method (after one warm-up), interleaved; the median is reported.
        dtype: Model and data dtype.
        spec: Backbone shape (default: the tiny preset's ViT), random init.
        seed: Seed of the model, the batch and the Monte-Carlo labels.
        threads: CPU threads for the run (restored afterwards); default: leave torch's setting. On a
            shared machine, 1 thread gives the steadiest timings.

    Returns:
        A JSON-ready dict: ``ratio_vs_loop`` (loop time / kit time), ``max_rel_err`` (largest
        per-tensor relative L2 difference kit vs loop), ``seconds``/``loop_seconds`` (medians),
        ``images_per_s``/``loop_images_per_s``, the setting, and ``approximations`` (method, relative
        L2 error to the exact Fisher over all entries, median seconds).
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device = torch.device(device)
        return _bench(batch_size, num_classes, classes_per_task, device, repeats, dtype, spec, seed)
    finally:
        torch.set_num_threads(before)


def _bench(
    batch_size: int, num_classes: int, classes_per_task: int, device: torch.device, repeats: int,
    dtype: torch.dtype, spec: BackboneSpec, seed: int,
) -> dict:
    torch.manual_seed(seed)
    backbone = make_backbone(spec).to(device=device, dtype=dtype)
    sizes = [classes_per_task] * (num_classes // classes_per_task) + [num_classes % classes_per_task]
    head = IncrementalHead([new_head(spec.embed_dim, n) for n in sizes if n]).to(device=device, dtype=dtype)
    x = torch.randn(batch_size, 3, spec.img_size, spec.img_size, device=device, dtype=dtype)
    y = torch.randint(num_classes, (batch_size,), device=device)
    names = tuned_weight_names(backbone)
    gen = torch.Generator().manual_seed(seed)

    def kit(**kwargs) -> Callable[[], dict[str, Tensor]]:
        return lambda: diagonal_fisher(backbone, head, [(x, y)], names=names, generator=gen, **kwargs).values

    methods = {
        "kit": kit(),
        "loop": lambda: official_loop_fisher(backbone, head, x, names),
        "top_k=5": kit(top_k=5),
        "mc k=1": kit(kind="mc", mc_samples=1),
        "mc k=10": kit(kind="mc", mc_samples=10),
        "empirical": kit(kind="empirical"),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    results: dict[str, dict[str, Tensor]] = {}
    for rep in range(repeats + 1):  # round 0 is the warm-up
        for m, fn in methods.items():
            seconds, results[m] = _timed(fn, device)
            if rep:
                times[m].append(seconds)
    med = {m: statistics.median(t) for m, t in times.items()}
    exact = results["kit"]
    return {
        "ratio_vs_loop": med["loop"] / med["kit"],
        "max_rel_err": _max_tensor_rel_err(exact, results["loop"]),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "num_classes": num_classes,
        "threads": torch.get_num_threads(),
        "seconds": med["kit"],
        "loop_seconds": med["loop"],
        "images_per_s": batch_size / med["kit"],
        "loop_images_per_s": batch_size / med["loop"],
        "approximations": [
            {"method": m, "rel_err": _rel_err(results[m], exact), "seconds": med[m]}
            for m in ("top_k=5", "mc k=1", "mc k=10", "empirical")
        ],
    }


def _random_modules(style: str, theta0: dict, names: list, n: int, gen: torch.Generator) -> list:
    """``n`` modules of a style with small random (non-zero) deltas, for timing."""
    modules = []
    for _ in range(n):
        module = TaskModule.create(style, theta0, names, rank=4, generator=gen)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        modules.append(module)
    return modules


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def bench_compose(
    *, num_modules: int = 10, batch_size: int = 256, repeats: int = 10, style: str = "lora", seed: int = 0
) -> dict:
    """Inference and training cost of composition as the number of modules grows.

    On the same inputs and in one process: a composed model of T = 1 and T = ``num_modules``
    modules (merged into one model), an output ensemble of ``num_modules`` models, and one IEL
    training step with 1 and ``num_modules`` frozen modules (pre-merged). Timings are the best of
    ``repeats`` runs; ratios near 1 mean "cost independent of T".

    Returns:
        ``{"composed_t10_over_t1", "ensemble_t10_over_t1", "train_step_t10_over_t1", "seconds",
        "device", "batch_size", "num_modules"}``.
    """
    from compolab.compose import ComposedForward, merge

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = make_backbone(TINY_VIT).requires_grad_(False)
    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    taus = [m.delta(theta0).detach() for m in _random_modules(style, theta0, names, num_modules, gen)]
    x = torch.randn(batch_size, 3, TINY_VIT.img_size, TINY_VIT.img_size, generator=gen)
    composed_1 = merge(backbone, theta0, taus[:1])
    composed_t = merge(backbone, theta0, taus)
    members = [merge(backbone, theta0, [tau], [1.0]) for tau in taus]

    def ensemble() -> torch.Tensor:
        return torch.stack([_forward(m, x) for m in members]).mean(0)

    def train_step(frozen: list) -> Callable[[], None]:
        module = TaskModule.create(style, theta0, names, rank=4, generator=gen)
        model = ComposedForward(backbone, theta0, frozen, module=module, coef=1 / (len(frozen) + 1))

        def step() -> None:
            model(x[:64]).square().mean().backward()
            module.zero_grad(set_to_none=True)

        return step

    step_1, step_t = train_step(taus[:1]), train_step(taus)
    seconds = {}
    for _ in range(3):  # interleave the measurements, keep the best of each
        for key, fn in (("composed_t1", lambda: _forward(composed_1, x)),
                        ("composed_t", lambda: _forward(composed_t, x)),
                        ("ensemble_t", ensemble), ("train_step_t1", step_1),
                        ("train_step_t", step_t)):  # fmt: skip
            seconds[key] = min(seconds.get(key, float("inf")), _best_time(fn, repeats))
    return {
        "composed_t10_over_t1": round(seconds["composed_t"] / seconds["composed_t1"], 3),
        "ensemble_t10_over_t1": round(seconds["ensemble_t"] / seconds["composed_t1"], 3),
        "train_step_t10_over_t1": round(seconds["train_step_t"] / seconds["train_step_t1"], 3),
        "seconds": {k: round(v, 5) for k, v in seconds.items()},
        "device": "cpu",
        "batch_size": batch_size,
        "num_modules": num_modules,
        "style": style,
    }


def bench_tmc(
    *,
    num_components: int = 10,
    batch_size: int = 64,
    num_classes: int = 50,
    repeats: int = 3,
    style: str = "full",
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Inference and training cost of TMC's linearised model against the plain (non-linear) one.

    On the tiny preset's ViT shape (random init), with a ``num_classes`` head and one batch, in one
    process and interleaved (best of ``repeats`` after a warm-up, best over 3 rounds):

    * ``plain``: one forward of a merged model θ0 + τ and its head (fused attention);
    * ``linearized``: one linearised forward, f(θ0) + Jτ with the head linearised too (primal +
      tangent pass, MATH attention);
    * ``tangent``: the composition of ``num_components`` components (one linearised forward);
    * ``ensemble``: the output ensemble of ``num_components`` merged non-linear models (T forwards);
    * ``tme``: the output ensemble of the ``num_components`` linearised models (T linearised
      forwards; the same outputs as ``tangent``, whose gap to it is reported as
      ``tangent_vs_tme_max_abs``);
    * one training step (forward + backward) of a linearised component against one of the
      ordinary fine-tuning forward (:class:`~compolab.compose.ComposedForward`).

    Args:
        num_components: T, the number of composed components / ensemble members.
        batch_size: Images per forward.
        num_classes: Outputs of the (base) head.
        repeats: Timed calls per measurement.
        style: Tuning style of the random components.
        seed: Seed of the model, the components and the batch.
        threads: CPU threads for the run (restored afterwards); default: leave torch's setting.

    Returns:
        ``{"linearized_over_plain", "tangent10_over_plain", "ensemble10_over_plain", "tme10_over_plain",
        "ensemble10_over_tangent10", "linearized_step_over_plain_step", "tangent_vs_tme_max_abs", "seconds",
        "device", "batch_size", "num_components", "style", "threads"}`` (the ``10`` in the keys is
        ``num_components``).
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench_tmc(num_components, batch_size, num_classes, repeats, style, seed)
    finally:
        torch.set_num_threads(before)


def _bench_tmc(num_components: int, batch_size: int, num_classes: int, repeats: int, style: str,
               seed: int) -> dict:  # fmt: skip
    from compolab.compose import ComposedForward, merge
    from compolab.linearize import LinearizedModel, TangentComponent, compose_linearized
    from compolab.task_vector import TaskVector
    from compolab.tmc import OutputEnsemble, base_head, scaled_square_loss

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = make_backbone(TINY_VIT).requires_grad_(False)
    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    head = base_head(TINY_VIT.embed_dim, num_classes, seed=seed)
    components = []
    for module in _random_modules(style, theta0, names, num_components, gen):
        shapes = {n: p.shape for n, p in head.named_parameters()}
        head_delta = TaskVector({n: 0.01 * torch.randn(shape, generator=gen) for n, shape in shapes.items()})
        components.append(TangentComponent(module.delta(theta0).detach(), head_delta))
    taus = [c.tau for c in components]
    x = torch.randn(batch_size, 3, TINY_VIT.img_size, TINY_VIT.img_size, generator=gen)
    y = torch.randint(num_classes, (batch_size,), generator=gen)
    plain = merge(backbone, theta0, taus[:1], [1.0])
    linearized = compose_linearized(backbone, components[:1], head=head)
    tangent = compose_linearized(backbone, components, head=head)
    ensemble = OutputEnsemble(backbone, theta0, taus, heads=head)
    tme = [compose_linearized(backbone, [c], head=head) for c in components]

    def tme_forward() -> torch.Tensor:
        return torch.stack([_forward(m, x) for m in tme]).mean(0)

    def plain_step() -> Callable[[], None]:
        module = TaskModule.create(style, theta0, names, rank=4, generator=gen)
        model = ComposedForward(backbone, theta0, module=module)
        step_head = new_head(TINY_VIT.embed_dim, num_classes)

        def step() -> None:
            nn.functional.cross_entropy(step_head(model(x)), y).backward()
            module.zero_grad(set_to_none=True)
            step_head.zero_grad(set_to_none=True)

        return step

    def linearized_step() -> Callable[[], None]:
        module = TaskModule.create(style, theta0, names, rank=4, generator=gen)
        model = LinearizedModel(backbone, theta0, module=module, head=head)

        def step() -> None:
            scaled_square_loss(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        return step

    with torch.no_grad():
        gap = float((_forward(tangent, x) - tme_forward()).abs().max())
    measured = {
        "plain": lambda: head(_forward(plain, x)),
        "linearized": lambda: _forward(linearized, x),
        "tangent": lambda: _forward(tangent, x),
        "ensemble": lambda: _forward(ensemble, x),
        "tme": tme_forward,
        "plain_step": plain_step(),
        "linearized_step": linearized_step(),
    }
    seconds: dict[str, float] = {}
    for _ in range(3):  # interleave the measurements, keep the best of each
        for key, fn in measured.items():
            seconds[key] = min(seconds.get(key, float("inf")), _best_time(fn, repeats))
    t = num_components
    return {
        "linearized_over_plain": round(seconds["linearized"] / seconds["plain"], 3),
        f"tangent{t}_over_plain": round(seconds["tangent"] / seconds["plain"], 3),
        f"ensemble{t}_over_plain": round(seconds["ensemble"] / seconds["plain"], 3),
        f"tme{t}_over_plain": round(seconds["tme"] / seconds["plain"], 3),
        f"ensemble{t}_over_tangent{t}": round(seconds["ensemble"] / seconds["tangent"], 3),
        "linearized_step_over_plain_step": round(seconds["linearized_step"] / seconds["plain_step"], 3),
        "tangent_vs_tme_max_abs": gap,
        "seconds": {k: round(v, 5) for k, v in seconds.items()},
        "device": "cpu",
        "batch_size": batch_size,
        "num_components": num_components,
        "style": style,
        "threads": torch.get_num_threads(),
    }


def bench_probe(
    *,
    points: int = 41,
    images: int = 500,
    num_classes: int = 50,
    chunk: int = 8,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Cost of one basin-probe curve (:func:`compolab.probes.interpolate`): ``points`` values of λ on
    ``images`` probe images (default: 41 points, 500 images).

    On the tiny preset's ViT shape (random init) with a ``num_classes`` head, in one process: the
    probe with one point per forward (its CPU default, fused attention), the vmapped probe
    (``chunk`` points per forward, math attention) and a plain loop (one merged model per λ). The
    curves are compared: ``max_abs_diff`` is their largest loss difference.

    Returns:
        ``{"curve_seconds", "vmap_seconds", "loop_seconds", "vmap_over_curve", "loop_over_curve",
        "point_images_per_s", "max_abs_diff", "points", "images", "chunk", "threads"}``.
    """
    import torch.nn.functional as F

    from compolab.compose import merge
    from compolab.probes import ProbeData, default_lambdas, interpolate

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        backbone = make_backbone(TINY_VIT).requires_grad_(False).eval()
        theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
        tau = _random_modules("lora", theta0, names, 1, gen)[0].delta(theta0).detach()
        theta0 = {n: theta0[n] for n in names}
        head = new_head(TINY_VIT.embed_dim, num_classes, generator=gen).requires_grad_(False)
        x = torch.randn(images, 3, TINY_VIT.img_size, TINY_VIT.img_size, generator=gen)
        y = torch.randint(num_classes, (images,), generator=gen)
        data = ProbeData({0: x}, {0: y})
        lambdas = default_lambdas(-0.5, 2.0, points)

        t0 = time.perf_counter()
        curve = interpolate(backbone, theta0, tau, data, head, lambdas, chunk=1, progress=False)
        curve_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        vmapped = interpolate(backbone, theta0, tau, data, head, lambdas, chunk=chunk, progress=False)
        vmap_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            models = (merge(backbone, theta0, [tau], [lam]) for lam in lambdas)
            loop = [F.cross_entropy(head(model(x)), y).item() for model in models]
        loop_seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return {
        "curve_seconds": round(curve_seconds, 3),
        "vmap_seconds": round(vmap_seconds, 3),
        "loop_seconds": round(loop_seconds, 3),
        "vmap_over_curve": round(vmap_seconds / curve_seconds, 2),
        "loop_over_curve": round(loop_seconds / curve_seconds, 2),
        "point_images_per_s": round(points * images / curve_seconds),
        "max_abs_diff": max(
            abs(a - b) for other in (vmapped.loss[0], loop) for a, b in zip(curve.loss[0], other, strict=True)
        ),
        "points": points,
        "images": images,
        "chunk": chunk,
        "threads": torch.get_num_threads() if threads is None else threads,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_flops(step: Callable[[], object]) -> float:
    """FLOPs of one call of ``step`` (forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def bench_step(
    *,
    preset: str = "tiny",
    runtime: Runtime | None = None,
    batch_size: int | None = None,
    steps: int = 4,
    repeats: int = 5,
    num_frozen: int = 2,
    seed: int = 0,
) -> dict:
    r"""Images/s of one training step: plain LoRA, ITA (Eq. 11–12) and IEL (Eq. 18–19), and of the Fisher.

    Same backbone (the preset's shape, random init: nothing is downloaded), batch, device and
    precision for all, in one process, through the kit's own :func:`~compolab.finetune.train_loop`
    (``steps`` optimiser steps per timed call, LoRA of the preset's rank, AdamW):

    * ``plain``: θ0 + τ_t, cross-entropy, no penalty;
    * ``ita``: the same plus ITA's penalty :math:`\frac{\alpha}{2}\sum \bar F \tau_t^2` and the head
      penalty, coupled (a loss term);
    * ``iel``: θ0 + (1/T) Σ_{s≤t} τ_s with ``num_frozen`` frozen (pre-merged) modules, plus IEL's
      penalty with its cross term and the head penalty;
    * ``fisher``: the preset's Fisher (tiny: Monte Carlo, paper: exact) of the batch at θ0.

    Each timed call comes after a warm-up call; the methods run round-robin ``repeats`` times and
    the median is reported. MFU = FLOPs per image (counted once on the plain step) × images/s /
    the device's dense bf16 peak (:data:`~compolab.distributed.PEAK_BF16_TFLOPS`; None on the CPU).

    Returns:
        ``images_per_s`` per step kind, ``ita_over_plain`` / ``iel_over_plain`` (time ratios),
        ``fisher_images_per_s``, ``flops_per_image``, ``mfu`` (per kind, or None) and the setting.
    """
    from compolab.compose import ComposedForward
    from compolab.config import get_preset, preset_configs
    from compolab.finetune import FinetuneConfig, train_loop
    from compolab.methods import get_method
    from compolab.methods.ita_iel import IEL, ITA
    from compolab.methods.penalties import head_penalty, iel_penalty, ita_penalty

    runtime = runtime or Runtime()
    device = runtime.device
    p = get_preset(preset)
    ita, iel = ITA.name, IEL.name  # the step kinds' keys: "plain" and the two methods' names
    ft, mc = preset_configs(p, get_method(ita), None)
    spec = p.backbone
    batch = batch_size or (ft.batch_size * ft.accumulate if device.type == "cuda" else ft.batch_size)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = make_backbone(spec).to(device).requires_grad_(False).eval()
    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    head0 = new_head(spec.embed_dim, 10, generator=gen).to(device)
    x = torch.randn(batch, 3, spec.img_size, spec.img_size, generator=gen).to(device)
    y = torch.randint(10, (batch,), generator=gen).to(device)
    loader = [(x, y)] * steps
    cfg = FinetuneConfig(style="lora", rank=ft.rank, epochs=1, batch_size=batch, accumulate=1, lr=ft.lr)

    fisher_times = []
    for rep in range(min(repeats, 3) + 1):  # round 0 is the warm-up
        _sync(device)
        t0 = time.perf_counter()
        with runtime.autocast_context():
            fisher = diagonal_fisher(backbone, head0, [(x, y)], names=names, kind=mc.fisher_kind,
                                     generator=gen)  # fmt: skip
        _sync(device)
        if rep:
            fisher_times.append(time.perf_counter() - t0)
    fisher_seconds = statistics.median(fisher_times)
    mean_f = fisher.mean(floor=1e-5)
    frozen = [m.delta(theta0).detach() for m in _random_modules("lora", theta0, names, num_frozen, gen)]
    previous = {n: sum(tau[n] for tau in frozen) for n in names}
    cls_fisher = {"weight": torch.full_like(head0.weight, 1e-3), "bias": torch.full_like(head0.bias, 1e-3)}

    def make(kind: str) -> Callable[[], None]:
        module = TaskModule.create("lora", theta0, names, rank=ft.rank,
                                   generator=torch.Generator(device=device).manual_seed(seed))  # fmt: skip
        head = copy.deepcopy(head0)
        incremental = kind == iel
        model = ComposedForward(backbone, theta0, frozen if incremental else (), module=module,
                                coef=1 / (num_frozen + 1) if incremental else 1.0)  # fmt: skip
        opt = torch.optim.AdamW([*module.parameters(), *head.parameters()], lr=cfg.lr)

        def penalty() -> Tensor:
            tau = dict(module.delta(theta0))
            if incremental:
                reg = iel_penalty(tau, previous, mean_f, mc.beta, num_frozen)
            else:
                reg = ita_penalty(tau, mean_f, mc.alpha)
            return reg + head_penalty(head, head0, cls_fisher, 0.025, 0.001)

        def call() -> None:
            train_loop(model, opt, loader, cfg, loss_fn=nn.functional.cross_entropy, head=head,
                       penalty=None if kind == "plain" else penalty, runtime=runtime)  # fmt: skip

        return call

    calls = {k: make(k) for k in ("plain", ita, iel)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for rep in range(repeats + 1):  # round 0 is the warm-up
        for k, fn in calls.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if rep:
                times[k].append((time.perf_counter() - start) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    one = make("plain")
    loader[:] = loader[:1]
    flops = _step_flops(one)  # forward + backward + AdamW of one step of batch images
    peak = peak_flops(device, runtime.precision)
    ips = {k: batch / s for k, s in med.items()}
    return {
        "images_per_s": {k: round(v, 1) for k, v in ips.items()},
        "step_seconds": {k: round(v, 5) for k, v in med.items()},
        f"{ita}_over_plain": round(med[ita] / med["plain"], 3),
        f"{iel}_over_plain": round(med[iel] / med["plain"], 3),
        "fisher_images_per_s": round(batch / fisher_seconds, 1),
        "fisher_kind": mc.fisher_kind,
        "flops_per_image": flops / batch,
        "peak_flops": peak,
        "mfu": {k: round(flops / batch * v / peak, 4) for k, v in ips.items()} if peak else None,
        "preset": preset,
        "backbone": spec.timm_name,
        "batch_size": batch,
        "steps_per_call": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        **runtime.describe(),
    }
