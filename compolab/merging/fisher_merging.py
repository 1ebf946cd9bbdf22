r"""Fisher merging: the per-coordinate average of the models weighted by their diagonal Fishers.

.. math::
    \theta = \frac{\sum_t w_t F_t \odot \theta_t}{\sum_t w_t F_t}
    \quad\Longleftrightarrow\quad
    \tau = \frac{\sum_t w_t F_t \odot \tau_t}{\sum_t w_t F_t}
    \qquad (\theta_t = \theta_0 + \tau_t;\ \theta_0 \text{ cancels since the weights sum to 1})

with every :math:`F_t` floored at ``floor`` (as the official code does), so a coordinate no
Fisher sees gets the weighted mean of the :math:`\tau_t` rather than 0 / 0.

Reference:
    M. Matena, C. Raffel. "Merging Models with Fisher-Weighted Averaging." NeurIPS 2022.
    arXiv:2111.09832.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from compolab.errors import ConfigError
from compolab.merging._common import Taus, check_aligned, check_in, check_taus

__all__ = ["fisher_merging"]


def _check_fishers(fishers: Sequence[Mapping[str, Tensor]], taus: Taus, keys: Sequence[str]) -> None:
    check_aligned("fishers", fishers, taus)
    for t, fisher in enumerate(fishers):
        missing = [k for k in keys if k not in fisher]
        if missing:
            raise ConfigError(f"`fishers`: the Fisher of task {t} lacks {missing}")
        shapes = [
            f"{k} {tuple(fisher[k].shape)} vs {tuple(taus[t][k].shape)}"
            for k in keys
            if fisher[k].shape != taus[t][k].shape
        ]
        if shapes:
            raise ConfigError(f"`fishers`: the Fisher of task {t} has mismatched shapes {shapes}")
        negative = [k for k in keys if bool((fisher[k] < 0).any())]
        if negative:
            raise ConfigError(f"`fishers`: the Fisher of task {t} has negative entries in {negative}")


def fisher_merging(
    taus: Taus,
    *,
    fishers: Sequence[Mapping[str, Tensor]],
    coefs: Sequence[float] | None = None,
    floor: float = 1e-6,
) -> dict[str, Tensor]:
    r""":math:`\sum_t w_t F_t \tau_t / \sum_t w_t F_t`, coordinate by coordinate.

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes.
        fishers: One diagonal Fisher per task vector, ``name -> tensor`` of the parameter's shape
            (e.g. ``DiagonalFisher.mean()``); it must cover every key of ``taus`` (extra keys,
            such as a head's, are ignored).
        coefs: The model weights :math:`w_t > 0`; default equal (they only matter relatively).
        floor: Every :math:`F_t` is raised to at least this (> 0); the official code's 1e-6.

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``.

    Raises:
        ConfigError: If ``taus`` is empty or mismatched; a Fisher lacks a key of ``taus`` (named),
            has another shape or a negative entry; ``fishers`` or ``coefs`` has the wrong length;
            a coefficient is not positive; or ``floor`` is not positive.

    Examples:
        >>> import torch
        >>> taus = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 0.0])}]
        >>> fishers = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([1.0, 1.0])}]
        >>> fisher_merging(taus, fishers=fishers)["w"]  # (1 + 3) / 2, (3 + 0) / 4
        tensor([2.0000, 0.7500])
    """
    keys = check_taus(taus)
    _check_fishers(fishers, taus, keys)
    coefs = [1.0] * len(taus) if coefs is None else list(coefs)
    check_aligned("coefs", coefs, taus)
    for w in coefs:
        check_in("coefs", w, "(0, inf)")
    check_in("floor", floor, "(0, inf)")
    merged = {}
    for k in keys:
        weights = [
            w * f[k].to(tau[k]).clamp(min=floor) for w, f, tau in zip(coefs, fishers, taus, strict=True)
        ]
        merged[k] = sum(f * tau[k] for f, tau in zip(weights, taus, strict=True)) / sum(weights)
    return merged
