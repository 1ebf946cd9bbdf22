r"""TIES-merging: trim each task vector, elect a sign per coordinate, average the agreeing tasks.

.. math::
    \hat\tau_t = \operatorname{top}_k(\tau_t), \qquad
    \gamma = \operatorname{sign}\Big(\sum_t \hat\tau_t\Big), \qquad
    \tau = \lambda\, \frac{\sum_{t \in A} \hat\tau_t}{\max(|A|, 1)}, \quad
    A = \{t : \operatorname{sign}(\hat\tau_t) = \gamma \neq 0\}

per coordinate, where :math:`\operatorname{top}_k` keeps the :math:`k = \max(1,
\operatorname{round}(\rho d))` largest magnitudes of the whole flattened :math:`\tau_t`
(:math:`d` numbers, density :math:`\rho`, halves rounded up; ties at the threshold are kept)
and zeroes the rest.
A coordinate no task agrees on (:math:`\gamma = 0`) is 0; the official code instead resolves
an exact :math:`\sum_t \hat\tau_t = 0` to the majority sign, a measure-zero difference.

Reference:
    P. Yadav, D. Tam, L. Choshen, C. Raffel, M. Bansal. "TIES-Merging: Resolving Interference
    When Merging Models." NeurIPS 2023. arXiv:2306.01708.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from compolab.merging._common import Taus, check_in, check_taus, stack

__all__ = ["disjoint_mean", "ties", "trim"]


def trim(tau: Mapping[str, Tensor], keys: Sequence[str], density: float) -> dict[str, Tensor]:
    r"""``tau`` with all but its :math:`\max(1, \operatorname{round}(\rho d))` largest magnitudes zeroed.

    The threshold is taken over all of ``keys`` together (the whole task vector), not per tensor.
    """
    magnitudes = torch.cat([tau[k].detach().reshape(-1).abs() for k in keys])
    keep = max(1, math.floor(density * magnitudes.numel() + 0.5))  # rounded half up
    threshold = magnitudes.kthvalue(magnitudes.numel() - keep + 1).values  # the keep-th largest
    return {k: tau[k] * (tau[k].abs() >= threshold) for k in keys}


def disjoint_mean(values: Tensor) -> Tensor:
    r"""Per coordinate, the mean of the entries whose sign is :math:`\gamma = \operatorname{sign}\sum_t`.

    Args:
        values: The trimmed entries, shape ``(T, *shape)``.

    Returns:
        Shape ``shape``; 0 where no entry agrees.
    """
    elected = torch.sign(values.sum(0))
    agree = (torch.sign(values) == elected) & (values != 0)
    return (values * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties(taus: Taus, *, density: float = 0.2, scale: float = 1.0) -> dict[str, Tensor]:
    r"""TIES-merging: trim to ``density``, elect signs, disjoint mean, times :math:`\lambda`.

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes.
        density: :math:`\rho \in (0, 1]`, the fraction of each task vector's entries kept (the
            paper's :math:`k` = 20%).
        scale: :math:`\lambda` (the paper tunes it on validation data; 1 is its usual value).

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``.

    Raises:
        ConfigError: If ``taus`` is empty or mismatched, or ``density`` is outside (0, 1].

    Examples:
        >>> import torch
        >>> taus = [{"w": torch.tensor([1.0, -2.0, 3.0])}, {"w": torch.tensor([3.0, 1.0, -1.0])}]
        >>> ties(taus, density=1.0)["w"]  # signs elected: +, -, +
        tensor([ 2., -2.,  3.])
    """
    keys = check_taus(taus)
    check_in("density", density, "(0, 1]")
    trimmed = [trim(tau, keys, density) for tau in taus]
    return {k: scale * disjoint_mean(stack(trimmed, k)) for k in keys}
