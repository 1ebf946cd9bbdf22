r"""Task arithmetic: the scaled sum of the task vectors.

.. math::
    \tau = \lambda \sum_{t=1}^{T} \tau_t

With the default :math:`\lambda = 1/T` this is the kit's uniform composition
(:func:`compolab.task_vector.compose` with :func:`~compolab.task_vector.uniform_coefs`).

Reference:
    G. Ilharco, M. T. Ribeiro, M. Wortsman, S. Gururangan, L. Schmidt, H. Hajishirzi,
    A. Farhadi. "Editing Models with Task Arithmetic." ICLR 2023. arXiv:2212.04089.
"""

from __future__ import annotations

from torch import Tensor

from compolab.merging._common import Taus, check_taus, stack

__all__ = ["task_arithmetic"]


def task_arithmetic(taus: Taus, *, scale: float | None = None) -> dict[str, Tensor]:
    r""":math:`\lambda \sum_t \tau_t`.

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes.
        scale: :math:`\lambda`; default :math:`1/T` (the mean).

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``.

    Raises:
        ConfigError: If ``taus`` is empty or its task vectors do not match.

    Examples:
        >>> import torch
        >>> taus = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 0.0])}]
        >>> task_arithmetic(taus)["w"], task_arithmetic(taus, scale=1.0)["w"]
        (tensor([2., 1.]), tensor([4., 2.]))
    """
    keys = check_taus(taus)
    lam = 1.0 / len(taus) if scale is None else scale
    return {k: lam * stack(taus, k).sum(0) for k in keys}
