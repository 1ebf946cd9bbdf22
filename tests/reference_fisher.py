"""The official code's exact Fisher, written out plainly: one backward pass per class, with hooks.

A transcription of mammoth's ``__compute_fisher_hooks`` (``models/second_order.py``), independent of
the kit's own copy in ``compolab.bench.fisher`` (its speed baseline). Every parameter is frozen;
the input is multiplied by a dummy ``requires_grad`` scalar so that the full backward hooks fire;
for each class c, :math:`\\sum_n \\sqrt{p_{nc}}\\,\\log p_{nc}` is back-propagated, and each Linear's
hooks turn its output gradient and input into per-sample weight gradients, squared and summed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def official_loop_fisher(
    backbone: nn.Module, head: nn.Module, x: Tensor, names: list[str]
) -> dict[str, Tensor]:
    """``name -> (out, in)``: :math:`\\sum_n \\sum_c p_{nc} (\\nabla \\log p_{nc})^2` of Linear weights.

    Args:
        backbone: Maps ``x`` to features; each of ``names`` is the weight of an ``nn.Linear`` in it.
        head: Maps features to logits (the softmax runs over all of them).
        x: One batch.
        names: The weights to compute, e.g. ``blocks.0.attn.qkv.weight``.
    """
    linears = {name: backbone.get_submodule(name.removesuffix(".weight")) for name in names}
    fisher = {name: torch.zeros_like(linear.weight) for name, linear in linears.items()}
    inputs: dict[str, Tensor] = {}
    handles = []
    for name, linear in linears.items():

        def keep_input(module, args, output, name=name):
            inputs[name] = args[0].detach()

        def add_squared_gradients(module, grad_input, grad_output, name=name):
            delta, a = grad_output[0], inputs[name]  # (N, [tokens,] out), (N, [tokens,] in)
            if a.ndim == 2:
                delta, a = delta[:, None], a[:, None]
            per_sample = torch.einsum("nto,nti->noi", delta, a)  # each sample's gradient of the weight
            fisher[name] += per_sample.square().sum(0)

        handles.append(linear.register_forward_hook(keep_input))
        handles.append(linear.register_full_backward_hook(add_squared_gradients))

    parameters = [*backbone.parameters(), *head.parameters()]
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        dummy = torch.ones((), dtype=x.dtype, requires_grad=True)
        log_p = torch.log_softmax(head(backbone(x * dummy)), dim=-1)
        p = log_p.detach().exp()
        for c in range(log_p.shape[1]):
            (p[:, c].sqrt() * log_p[:, c]).sum().backward(retain_graph=True)
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in zip(parameters, flags, strict=True):
            param.requires_grad_(flag)
    return fisher
