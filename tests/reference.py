"""Brute-force references, written as plainly as possible: slow, obviously correct, for tiny models.

Every function here loops over samples (and classes) and calls ``torch.autograd.grad`` on one scalar
at a time. Nothing is batched, hooked or vmapped. Use float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def named(model: nn.Module, names: Sequence[str]) -> list[Tensor]:
    params = dict(model.named_parameters())
    return [params[n] for n in names]


def fisher_reference(
    model: Callable[[Tensor], Tensor],
    parameters: dict[str, Tensor],
    inputs: Tensor,
    labels: Tensor | None = None,
    classes: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Sum over samples of :math:`\\sum_c p_c (\\nabla \\log p_c)^2` (or the squared gradient at ``labels``).

    Args:
        model: Maps a batch ``(1, ...)`` to logits ``(1, C)`` and depends on ``parameters``.
        parameters: ``name -> leaf tensor (requires_grad)``.
        inputs: ``(N, ...)``.
        labels: If given, the empirical Fisher at these logit columns instead.
        classes: If given, only these classes in the sum over c (the official top-k knob).
    """
    names = list(parameters)
    total = {n: torch.zeros_like(p) for n, p in parameters.items()}
    for n in range(inputs.shape[0]):
        log_p = torch.log_softmax(model(inputs[n : n + 1])[0], dim=-1)
        p = log_p.exp().detach()
        if labels is not None:
            terms = [(int(labels[n]), 1.0)]
        else:
            terms = [(c, float(p[c])) for c in (classes if classes is not None else range(len(p)))]
        for c, weight in terms:
            grads = torch.autograd.grad(log_p[c], [parameters[k] for k in names], retain_graph=True)
            for k, g in zip(names, grads, strict=True):
                total[k] += weight * g.square()
    return total


def dense_hessian_reference(loss_fn: Callable[[], Tensor], parameters: list[Tensor]) -> Tensor:
    """The full Hessian of ``loss_fn()`` in the flattened order of ``parameters``, row by row."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, parameters, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], parameters, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            (r if r is not None else torch.zeros_like(p)).reshape(-1)
            for r, p in zip(row, parameters, strict=True)
        ]))
    return torch.stack(rows)
