r"""``compolab bench fisher``: the kit's exact diagonal Fisher against the official per-class loop.

:func:`bench_fisher` builds one model (the tiny preset's ViT shape, random init, an
``IncrementalHead``) and one batch, then times in the same process, round-robin:

* the kit's exact Fisher (:func:`compolab.fisher.diagonal_fisher`: batched backward over classes);
* the official code's method (:func:`official_loop_fisher`, the speed baseline): all parameters
  frozen, the input multiplied by a dummy ``requires_grad`` scalar so that
  ``register_full_backward_hook`` fires, and one ``backward(retain_graph=True)`` per class of
  :math:`\sum_n \sqrt{p_c}\,\log p_c`;
* the approximations (top-k classes, Monte Carlo with 1 and 10 labels, empirical), with their
  relative error to the exact Fisher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from compolab.bench.timing import median_of_rounds
from compolab.bench.timing import threads as cpu_threads
from compolab.fisher import diagonal_fisher
from compolab.heads import IncrementalHead, new_head
from compolab.models import TINY_VIT, BackboneSpec, make_backbone, tuned_weight_names

__all__ = ["bench_fisher", "official_loop_fisher"]

APPROXIMATIONS = ("top_k=5", "mc k=1", "mc k=10", "empirical")


def official_loop_fisher(
    backbone: nn.Module, head: nn.Module, x: Tensor, names: list[str]
) -> dict[str, Tensor]:
    r"""The official code's exact Fisher of one batch (``__compute_fisher_hooks``): the speed baseline.

    Args:
        backbone: Maps ``x`` to features; ``names`` are ``nn.Linear`` weights of it.
        head: Features to logits.
        x: One batch.
        names: The Linear weights to compute.

    Returns:
        ``name -> (out, in)``: :math:`\sum_n \sum_c p_c (\nabla \log p_c)^2`.
    """
    modules = {n: backbone.get_submodule(n.rsplit(".", 1)[0]) for n in names}
    inputs: dict[str, Tensor] = {}
    fisher = {n: torch.zeros_like(m.weight) for n, m in modules.items()}

    def keep_input(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            inputs[name] = args[0].detach()

        return hook

    def add_square(name: str) -> Callable:
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
            handles += [m.register_forward_hook(keep_input(n)), m.register_full_backward_hook(add_square(n))]
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
        threads: CPU threads for the run (restored afterwards); default: leave torch's setting.

    Returns:
        A JSON-ready dict: ``ratio_vs_loop`` (loop time / kit time), ``max_rel_err`` (largest
        per-tensor relative L2 difference kit vs loop), ``seconds``/``loop_seconds`` (medians),
        ``images_per_s``/``loop_images_per_s``, the setting, and ``approximations`` (method, relative
        L2 error to the exact Fisher over all entries, median seconds).
    """
    device = torch.device(device)
    with cpu_threads(threads):
        torch.manual_seed(seed)
        backbone = make_backbone(spec).to(device=device, dtype=dtype)
        sizes = [classes_per_task] * (num_classes // classes_per_task) + [num_classes % classes_per_task]
        head = IncrementalHead([new_head(spec.embed_dim, n) for n in sizes if n])
        head = head.to(device=device, dtype=dtype)
        x = torch.randn(batch_size, 3, spec.img_size, spec.img_size, device=device, dtype=dtype)
        y = torch.randint(num_classes, (batch_size,), device=device)
        names = tuned_weight_names(backbone)
        gen = torch.Generator().manual_seed(seed)

        def kit(**kwargs) -> Callable[[], dict[str, Tensor]]:
            return lambda: diagonal_fisher(backbone, head, [(x, y)], names=names, generator=gen,
                                           **kwargs).values  # fmt: skip

        med, results = median_of_rounds({
            "kit": kit(),
            "loop": lambda: official_loop_fisher(backbone, head, x, names),
            "top_k=5": kit(top_k=5),
            "mc k=1": kit(kind="mc", mc_samples=1),
            "mc k=10": kit(kind="mc", mc_samples=10),
            "empirical": kit(kind="empirical"),
        }, repeats, device)  # fmt: skip
        used_threads = torch.get_num_threads()
    exact = results["kit"]
    return {
        "ratio_vs_loop": med["loop"] / med["kit"],
        "max_rel_err": _max_tensor_rel_err(exact, results["loop"]),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "num_classes": num_classes,
        "threads": used_threads,
        "seconds": med["kit"],
        "loop_seconds": med["loop"],
        "images_per_s": batch_size / med["kit"],
        "loop_images_per_s": batch_size / med["loop"],
        "approximations": [
            {"method": m, "rel_err": _rel_err(results[m], exact), "seconds": med[m]} for m in APPROXIMATIONS
        ],
    }
