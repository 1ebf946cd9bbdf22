r"""DARE: drop each coordinate of each task vector at random and rescale the rest.

.. math::
    \tilde\tau_t = \frac{m_t \odot \tau_t}{1 - p}, \quad m_t \sim \operatorname{Bernoulli}(1 - p)
    \ \text{i.i.d. per coordinate}, \qquad \mathbb{E}[\tilde\tau_t] = \tau_t

then ``dare`` merges the :math:`\tilde\tau_t` by task arithmetic (:math:`\lambda \sum_t
\tilde\tau_t`) and ``dare_ties`` by TIES (:func:`~compolab.merging.ties.ties`, with no further
trimming by default). The masks come from a CPU generator seeded with ``seed``, drawn task by task
and key by key in the order of ``taus[0]`` (float64 uniforms, kept where :math:`u \ge p`), so a
seed gives the same merge on every device.

Reference:
    L. Yu, B. Yu, H. Yu, F. Huang, Y. Li. "Language Models are Super Mario: Absorbing Abilities
    from Homologous Models as a Free Lunch." ICML 2024. arXiv:2311.03099.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from compolab.merging._common import Taus, check_in, check_taus, stack
from compolab.merging.ties import ties

__all__ = ["dare", "dare_ties", "drop_and_rescale"]


def drop_and_rescale(taus: Taus, keys: Sequence[str], p: float, seed: int) -> list[dict[str, Tensor]]:
    r"""The :math:`\tilde\tau_t = m_t \odot \tau_t / (1 - p)` of every task vector (new tensors)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for tau in taus:
        masks = {k: torch.rand(tau[k].shape, generator=generator, dtype=torch.float64) >= p for k in keys}
        out.append({k: tau[k] * masks[k].to(tau[k].device) / (1.0 - p) for k in keys})
    return out


def dare(taus: Taus, *, p: float = 0.9, seed: int = 0, scale: float = 1.0) -> dict[str, Tensor]:
    r"""DARE then task arithmetic: :math:`\lambda \sum_t \tilde\tau_t`.

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes.
        p: Drop probability :math:`p \in [0, 1)`; :math:`p = 0` gives :math:`\lambda\sum_t\tau_t`.
        seed: Seed of the drop masks (the merge is a deterministic function of it).
        scale: :math:`\lambda`.

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``.

    Raises:
        ConfigError: If ``taus`` is empty or mismatched, or ``p`` is outside [0, 1).

    Examples:
        >>> import torch
        >>> dare([{"w": torch.ones(6)}], p=0.5, seed=0)["w"]  # each entry is 0 or 1 / (1 - p)
        tensor([2., 2., 0., 2., 2., 2.])
    """
    keys = check_taus(taus)
    check_in("p", p, "[0, 1)")
    dropped = drop_and_rescale(taus, keys, p, seed)
    return {k: scale * stack(dropped, k).sum(0) for k in keys}


def dare_ties(
    taus: Taus, *, p: float = 0.9, seed: int = 0, density: float = 1.0, scale: float = 1.0
) -> dict[str, Tensor]:
    r"""DARE then TIES-merging of the :math:`\tilde\tau_t` (sign election, disjoint mean).

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes.
        p: Drop probability :math:`p \in [0, 1)`.
        seed: Seed of the drop masks.
        density: TIES trimming of the :math:`\tilde\tau_t`; 1 (default) keeps every survivor.
        scale: :math:`\lambda`.

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``.

    Raises:
        ConfigError: If ``taus`` is empty or mismatched, ``p`` is outside [0, 1) or
            ``density`` outside (0, 1].
    """
    keys = check_taus(taus)
    check_in("p", p, "[0, 1)")
    check_in("density", density, "(0, 1]")
    return ties(drop_and_rescale(taus, keys, p, seed), density=density, scale=scale)
