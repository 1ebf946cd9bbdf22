r"""Iso-C: task arithmetic with a flattened (isotropic) singular spectrum per matrix.

For a 2-D weight, with the thin SVD :math:`\sum_t \tau_t = U \Sigma V^\top` and
:math:`r = \min(\text{out}, \text{in})`,

.. math::
    \tau = \lambda\, \bar\sigma\, U V^\top, \qquad \bar\sigma = \frac1r \sum_{i=1}^{r} \sigma_i .

Other parameters (biases, norms, 3-D/4-D tensors) get the mean :math:`\lambda \frac1T \sum_t
\tau_t`, as in the official code.

Reference:
    D. Marczak, S. Magistri, S. Cygert, B. Twardowski, A. D. Bagdanov, J. van de Weijer.
    "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces."
    ICML 2025. arXiv:2502.04959.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compolab.merging._common import Taus, check_taus, linalg_dtype, stack

__all__ = ["iso_c"]


def iso_c(taus: Taus, *, scale: float = 1.0) -> dict[str, Tensor]:
    r""":math:`\lambda \bar\sigma U V^\top` of :math:`\sum_t \tau_t` per 2-D weight; the mean elsewhere.

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes.
        scale: :math:`\lambda` (the paper's :math:`\alpha`, tuned on validation data).

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``.

    Raises:
        ConfigError: If ``taus`` is empty or mismatched.

    Examples:
        >>> import torch
        >>> taus = [{"w": torch.diag(torch.tensor([3.0, 0.0]))}, {"w": torch.diag(torch.tensor([0.0, 1.0]))}]
        >>> torch.linalg.svdvals(iso_c(taus)["w"])  # spectrum (3, 1) -> (2, 2)
        tensor([2., 2.])
    """
    keys = check_taus(taus)
    merged = {}
    for k in keys:
        total = stack(taus, k).sum(0)
        if total.ndim == 2:
            u, s, vh = torch.linalg.svd(total.to(linalg_dtype(total)), full_matrices=False)
            merged[k] = (scale * s.mean() * (u @ vh)).to(total.dtype)
        else:
            merged[k] = scale * total / len(taus)
    return merged
