r"""The penalties of ITA (Eq. 11–12) and IEL (Eq. 18–19), the head penalty and the head's Fisher.

All are pure functions of named tensors, differentiated by autograd; ``tau`` is the current
module's :math:`\tau_t` (its dense :math:`\Delta W`, keyed by weight name) and ``fisher`` the
diagonal Fisher :math:`\bar F` (mean per example) with the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from compolab.heads import IncrementalHead

__all__ = ["ita_penalty", "iel_penalty", "head_penalty", "linear_head_fisher"]


def ita_penalty(tau: Mapping[str, Tensor], fisher: Mapping[str, Tensor], alpha: float) -> Tensor:
    r"""ITA's penalty (Eq. 11–12): :math:`\frac{\alpha}{2}\sum_i \bar F^{(i)} (\tau_t^{(i)})^2`.

    Its gradient is :math:`\alpha\,\bar F \odot \tau_t`, the official code's closed form.

    Args:
        tau: :math:`\tau_t`, ``name -> ΔW``.
        fisher: :math:`\bar F`, every key of ``tau``.
        alpha: :math:`\alpha \ge 0`.

    Returns:
        The scalar penalty.

    Examples:
        >>> import torch
        >>> ita_penalty({"w": torch.tensor([2.0])}, {"w": torch.tensor([3.0])}, alpha=0.5)
        tensor(3.)
    """
    return 0.5 * alpha * sum((fisher[n] * d.square()).sum() for n, d in tau.items())


def iel_penalty(
    tau: Mapping[str, Tensor],
    previous: Mapping[str, Tensor],
    fisher: Mapping[str, Tensor],
    beta: float,
    t: int,
) -> Tensor:
    r"""IEL's penalty (Eq. 18–19) at task ``t``, with T = t + 1 (T := 2 at t = 0, as the official code).

    .. math:: \beta\Big[\tfrac12\big(1-\tfrac1T\big)\sum_i \bar F^{(i)} (\tau_t^{(i)})^2
              - \tfrac1T \sum_i \bar F^{(i)} \tau_t^{(i)} \sum_{s<t}\tau_s^{(i)}\Big]

    Its gradient, :math:`\beta(1-\tfrac1T)\bar F\odot\tau_t - \tfrac{\beta}{T}\bar F\odot\sum_{s<t}\tau_s`,
    is :math:`\beta T\,\partial\Omega/\partial\tau_t` with Ω the Jensen gap of the paper's Theorem 1
    (Hessian → :math:`\bar F`, :math:`w_s = 1/T`).

    Args:
        tau: :math:`\tau_t`, ``name -> ΔW``.
        previous: :math:`\sum_{s<t}\tau_s` (empty at t = 0: no cross term).
        fisher: :math:`\bar F`, every key of ``tau``.
        beta: :math:`\beta \ge 0`.
        t: The task index (0-based).

    Returns:
        The scalar penalty.

    Examples:
        >>> import torch
        >>> d, s, f = {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}
        >>> iel_penalty(d, s, f, beta=1.0, t=1)  # 0.5 * 0.5 * 4 - 0.5 * 2
        tensor(0.)
    """
    T = 2 if t == 0 else t + 1
    self_term = sum((fisher[n] * d.square()).sum() for n, d in tau.items())
    cross = sum((fisher[n] * d * previous[n]).sum() for n, d in tau.items() if n in previous)
    return beta * (0.5 * (1 - 1 / T) * self_term - cross / T)


def head_penalty(
    head: nn.Linear, anchor: nn.Linear, fisher: Mapping[str, Tensor], fisher_weight: float, l2_weight: float
) -> Tensor:
    r"""The head penalty :math:`\lambda_F \sum F_{cls} \Delta^2 + \lambda_2 \sum \Delta^2`.

    :math:`\Delta` = ``head`` − ``anchor`` (the pre-tuned head), weight and bias; the anchor is
    constant. No ½, as the official code.

    Args:
        head: The trained head :math:`h_t`.
        anchor: The pre-tuned head :math:`C_{pre}[t]`.
        fisher: :math:`F_{cls}`: ``weight`` and ``bias`` (:func:`linear_head_fisher`).
        fisher_weight: :math:`\lambda_F` (``req_weight_cls``).
        l2_weight: :math:`\lambda_2` (``simple_reg_weight_cls``).

    Returns:
        The scalar penalty.

    Examples:
        >>> from torch import nn
        >>> h, a = nn.Linear(1, 1), nn.Linear(1, 1)
        >>> _ = [nn.init.constant_(p, 1.0) for p in h.parameters()]
        >>> _ = [nn.init.zeros_(p) for p in a.parameters()]
        >>> f = {"weight": torch.tensor([[2.0]]), "bias": torch.tensor([3.0])}
        >>> head_penalty(h, a, f, fisher_weight=1.0, l2_weight=0.5).item()  # (2 + 3) + 0.5 * 2
        6.0
    """
    total = head.weight.new_zeros(())
    for name in ("weight", "bias"):
        diff = getattr(head, name) - getattr(anchor, name).detach()
        total = total + fisher_weight * (fisher[name] * diff.square()).sum() + l2_weight * diff.square().sum()
    return total


@torch.no_grad()
def linear_head_fisher(head: IncrementalHead, index: int, features: Tensor) -> dict[str, Tensor]:
    r"""Exact Fisher (mean per example) of head ``index``'s weight and bias on ``features``.

    For a linear softmax head the true Fisher has a closed form: row j of the weight gets
    :math:`\mathbb E_x[p_j(1-p_j)\, x^{\odot 2}]` and its bias :math:`\mathbb E_x[p_j(1-p_j)]`
    (since :math:`\sum_c p_c (\mathbb 1[c=j]-p_j)^2 = p_j(1-p_j)`), with p the softmax over every
    class of ``head``.

    Args:
        head: All heads so far (the softmax runs over all their classes).
        index: Which head's Fisher.
        features: ``(N, D)`` inputs of the head.

    Returns:
        ``{"weight": (C_index, D), "bias": (C_index,)}``.
    """
    p = head(features).softmax(-1)
    start = sum(h.out_features for h in head.heads[:index])
    q = p[:, start : start + head.heads[index].out_features]
    w = q * (1 - q)  # (N, classes of the head)
    return {"weight": w.T @ features.square() / len(features), "bias": w.mean(0)}
