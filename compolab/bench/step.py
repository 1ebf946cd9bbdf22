r"""``compolab bench step``: images/s of a plain LoRA step, an ITA step and an IEL step, and of the Fisher.

The ITA and IEL steps carry their method's own penalty, weighted as the method weighs it (the
preset's :class:`~compolab.methods.MethodConfig` through :func:`~compolab.config.preset_configs`):
:func:`~compolab.methods.ita_penalty` / :func:`~compolab.methods.iel_penalty` at the preset's α / β,
plus :func:`~compolab.methods.head_penalty` with the head's own Fisher
(:func:`~compolab.methods.linear_head_fisher`), applied coupled or decoupled as the method applies it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from compolab.bench.parts import random_modules
from compolab.bench.timing import median_of_rounds
from compolab.fisher import PAPER_FISHER_FLOOR, DiagonalFisher, diagonal_fisher
from compolab.heads import IncrementalHead, new_head
from compolab.methods import MethodConfig, head_penalty, iel_penalty, ita_penalty, linear_head_fisher
from compolab.models import make_backbone, theta0_of, tuned_weight_names
from compolab.runtime import Runtime, peak_flops
from compolab.stem import stem_is_frozen
from compolab.tuning import TaskModule

__all__ = ["bench_step"]

#: Suffix of the step kinds that run on cached stem tokens.
CACHED = "+stem-cache"


def _step_flops(step: Callable[[], object]) -> float:
    """FLOPs of one call of ``step`` (forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def _method_penalty(
    mc: MethodConfig,
    incremental: bool,
    tau_of: Callable[[], dict[str, Tensor]],
    head: nn.Linear,
    anchor: nn.Linear,
    fisher: Mapping[str, Tensor],
    cls_fisher: Mapping[str, Tensor],
    previous: Mapping[str, Tensor],
    t: int,
    kfacs: Sequence | None = None,
) -> Callable[[], Tensor]:
    """``penalty()`` of an ITA (or, ``incremental``, IEL) step at task ``t``, as the method builds it.

    The backbone term at α (ITA) or β (IEL) of ``mc``, plus the head term at ``req_weight_cls``
    (default: that same strength) and ``simple_reg_weight_cls``; with ``kfacs`` (one
    :class:`~compolab.kfac.KFAC` per task the penalty sums over) the backbone term through K-FAC
    (``--curvature kfac``).
    """
    from compolab.kfac import iel_kfac_penalty, kfac_penalty

    strength = mc.beta if incremental else mc.alpha
    req = mc.req_weight_cls if mc.req_weight_cls is not None else strength

    def penalty() -> Tensor:
        tau = tau_of()
        if kfacs is not None:
            reg = iel_kfac_penalty(tau, previous, kfacs, strength, t) if incremental else \
                kfac_penalty(tau, kfacs, strength)  # fmt: skip
        elif incremental:
            reg = iel_penalty(tau, previous, fisher, strength, t)
        else:
            reg = ita_penalty(tau, fisher, strength)
        return reg + head_penalty(head, anchor, cls_fisher, req, mc.simple_reg_weight_cls)

    return penalty


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
      penalty;
    * ``iel``: θ0 + (1/T) Σ_{s≤t} τ_s with ``num_frozen`` frozen (pre-merged) modules, plus IEL's
      penalty with its cross term and the head penalty;
    * ``fisher``: the preset's Fisher (tiny: Monte Carlo, paper: exact) of the batch at θ0;
    * ``ita+kfac``, ``iel+kfac``: ITA / IEL with ``--curvature kfac`` (one K-FAC of the batch per
      task the penalty sums over: ``num_frozen`` previous tasks for ITA, those and the current one
      for IEL), ``kfac_over_diag`` their time ratios to the diagonal steps;
    * ``plain+stem-cache``, ``ita+stem-cache``, ``iel+stem-cache``: the same three steps on the
      batch's stem tokens, computed once (:mod:`compolab.stem`; only where the stem is frozen, the
      tiny ViT): before / after the stem cache in one run, ``stem_cache_speedup`` their time ratio.

    Each timed call comes after a warm-up call; the methods run round-robin ``repeats`` times and
    the median is reported. MFU = FLOPs per image (counted once on the plain step) × images/s /
    the device's dense bf16 peak (:data:`~compolab.runtime.PEAK_BF16_TFLOPS`; None on the CPU).

    Returns:
        ``images_per_s`` per step kind, ``ita_over_plain`` / ``iel_over_plain`` (time ratios),
        ``fisher_images_per_s``, ``flops_per_image``, ``mfu`` (per kind, or None) and the setting.
    """
    from compolab.compose import ComposedForward
    from compolab.config import get_preset, preset_configs
    from compolab.finetune import FinetuneConfig, train_loop
    from compolab.methods import get_method
    from compolab.methods.ita_iel import IEL, ITA

    runtime = runtime or Runtime()
    device = runtime.device
    p = get_preset(preset)
    ita, iel = ITA.name, IEL.name  # the step kinds' keys: "plain" and the two methods' names
    configs = {kind: preset_configs(p, get_method(kind), None) for kind in (ita, iel)}
    ft, mc = configs[ita]  # the batch, rank, learning rate and Fisher kind of the preset
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
    stem_cached = stem_is_frozen(backbone, names)  # the tiny ViT: its stem output, once per image
    with torch.no_grad():
        tokens = backbone.patch_embed(x) if stem_cached else None
    token_loader = [(tokens, y)] * steps
    cfg = FinetuneConfig(style="lora", rank=ft.rank, epochs=1, batch_size=batch, accumulate=1, lr=ft.lr)

    def batch_fisher() -> DiagonalFisher:
        with runtime.autocast_context():
            return diagonal_fisher(backbone, head0, [(x, y)], names=names, kind=mc.fisher_kind,
                                   top_k=mc.fisher_top_k, mc_samples=mc.mc_samples,
                                   generator=gen)  # fmt: skip

    fisher_med, fisher_out = median_of_rounds({"fisher": batch_fisher}, min(repeats, 3), device)
    mean_f = fisher_out["fisher"].mean(floor=PAPER_FISHER_FLOOR)
    with torch.no_grad():
        features = backbone(x).float()
    head_fisher = linear_head_fisher(IncrementalHead([head0]), 0, features)
    cls_fisher = {k: v + PAPER_FISHER_FLOOR for k, v in head_fisher.items()}
    frozen = [m.delta(theta0).detach() for m in random_modules("lora", theta0, names, num_frozen, gen)]
    previous = {n: sum(tau[n] for tau in frozen) for n in names}

    from compolab.errors import CompolabError
    from compolab.kfac import kfac_at

    try:  # the batch's K-FAC, standing for each task's
        kfac = kfac_at(backbone, head0, [(x, y)], names, fisher_type="mc", seed=seed)
    except CompolabError:  # no curvlinops here (e.g. a GPU image without the registry): no K-FAC steps
        kfac = None

    def make(kind: str, batches: list | None = None, curvature: str = "diag") -> Callable[[], None]:
        module = TaskModule.create("lora", theta0, names, rank=ft.rank,
                                   generator=torch.Generator(device=device).manual_seed(seed))  # fmt: skip
        head = copy.deepcopy(head0)
        incremental = kind == iel
        model = ComposedForward(backbone, theta0, frozen if incremental else (), module=module,
                                coef=1 / (num_frozen + 1) if incremental else 1.0)  # fmt: skip
        opt = torch.optim.AdamW([*module.parameters(), *head.parameters()], lr=cfg.lr)
        penalty, decoupled = None, None
        if kind != "plain":
            mk = configs[kind][1]
            kfacs = [kfac] * (num_frozen + incremental) if curvature == "kfac" else None
            penalty = _method_penalty(mk, incremental, lambda: dict(module.delta(theta0)), head, head0,
                                      mean_f, cls_fisher, previous, num_frozen, kfacs)  # fmt: skip
            as_step = mk.decoupled if mk.decoupled is not None else cfg.style != "full"  # the method's rule
            decoupled = [*module.parameters(), *head.parameters()] if as_step else None

        def call() -> None:
            train_loop(model, opt, loader if batches is None else batches, cfg,
                       loss_fn=nn.functional.cross_entropy, head=head, penalty=penalty,
                       decoupled=decoupled, runtime=runtime)  # fmt: skip

        return call

    kinds = {k: make(k) for k in ("plain", ita, iel)}
    if kfac is not None:
        kinds.update({f"{k}+kfac": make(k, curvature="kfac") for k in (ita, iel)})
    if stem_cached:  # the same steps on the cached stem tokens (compolab.stem.cache_stem)
        kinds.update({f"{k}{CACHED}": make(k, token_loader) for k in ("plain", ita, iel)})
    seconds, _ = median_of_rounds(kinds, repeats, device)
    med = {k: s / steps for k, s in seconds.items()}
    speedup = {k: round(med[k] / med[f"{k}{CACHED}"], 3) for k in ("plain", ita, iel) if stem_cached}
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
        "kfac_over_diag": {k: round(med[f"{k}+kfac"] / med[k], 3) for k in (ita, iel)} if kfac else None,
        "kfac_bytes": sum(kfac.memory_bytes().values()) if kfac else None,
        "stem_cache_speedup": speedup or None,
        "fisher_images_per_s": round(batch / fisher_med["fisher"], 1),
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
