r"""TSV-M: keep each task's top singular triplets of every matrix, decorrelate them, and sum.

For a 2-D weight with :math:`\tau_t = U_t \Sigma_t V_t^\top` (rank :math:`r = \min(\text{out},
\text{in})`), keep each task's :math:`k` leading triplets, :math:`k = \lfloor r/T \rfloor` (or
:math:`\max(1, \lfloor f r \rfloor)` for a ``fraction`` :math:`f`), concatenate them,

.. math::
    U = [U_1^{(k)} \cdots U_T^{(k)}],\quad \Sigma = \operatorname{diag}(\Sigma_1^{(k)}, \ldots,
    \Sigma_T^{(k)}),\quad V = [V_1^{(k)} \cdots V_T^{(k)}],

and replace :math:`U` and :math:`V` by their nearest orthonormal matrices (orthogonal
Procrustes: :math:`U_\perp = P Q^\top` for the SVD :math:`U = P S Q^\top`, the same for
:math:`V`):

.. math::
    \tau = \lambda\, U_\perp \Sigma V_\perp^\top .

Other parameters (biases, norms, 3-D/4-D tensors such as a patch-embedding convolution) get the
mean :math:`\lambda \frac1T\sum_t \tau_t`, as in the official code.

Reference:
    A. A. Gargiulo, D. Crisostomi, M. S. Bucarelli, S. Scardapane, F. Silvestri, E. Rodolà.
    "Task Singular Vectors: Reducing Task Interference in Model Merging." CVPR 2025.
    arXiv:2412.00081.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from compolab.merging._common import Taus, check_in, check_taus, linalg_dtype, stack

__all__ = ["nearest_orthonormal", "tsv_m"]


def nearest_orthonormal(a: Tensor) -> Tensor:
    r""":math:`P Q^\top` for the thin SVD :math:`a = P S Q^\top`: the closest matrix to ``a`` (in
    Frobenius norm) with orthonormal columns (rows, if ``a`` is wide)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _merge_matrix(mats: Sequence[Tensor], fraction: float | None) -> Tensor:
    us, sigmas, vs = [], [], []
    for m in mats:
        u, s, vh = torch.linalg.svd(m.to(linalg_dtype(m)), full_matrices=False)
        k = s.numel() // len(mats) if fraction is None else math.floor(fraction * s.numel())
        us.append(u[:, : max(k, 1)])
        sigmas.append(s[: max(k, 1)])
        vs.append(vh[: max(k, 1)].mT)
    u, v = nearest_orthonormal(torch.cat(us, 1)), nearest_orthonormal(torch.cat(vs, 1))
    return ((u * torch.cat(sigmas)) @ v.mT).to(mats[0].dtype)  # U diag(sigma) V^T


def tsv_m(taus: Taus, *, fraction: float | None = None, scale: float = 1.0) -> dict[str, Tensor]:
    r"""Task Singular Vectors merge (TSV-M) of every 2-D weight; the mean of other parameters.

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes.
        fraction: :math:`f \in (0, 1]`, the share of each task's spectrum kept; default
            :math:`1/T` (:math:`k = \lfloor r/T \rfloor`). At least one triplet is always kept.
        scale: :math:`\lambda` (the paper's :math:`\alpha`, 1 by default).

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``.

    Raises:
        ConfigError: If ``taus`` is empty or mismatched, or ``fraction`` is outside (0, 1].

    Examples:
        >>> import torch
        >>> tau = {"w": torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=torch.float64)}
        >>> torch.allclose(tsv_m([tau], fraction=1.0)["w"], tau["w"])  # T = 1, full rank: tau itself
        True
    """
    keys = check_taus(taus)
    if fraction is not None:
        check_in("fraction", fraction, "(0, 1]")
    merged = {}
    for k in keys:
        if taus[0][k].ndim == 2:
            merged[k] = scale * _merge_matrix([tau[k] for tau in taus], fraction)
        else:
            merged[k] = scale * stack(taus, k).mean(0)
    return merged
