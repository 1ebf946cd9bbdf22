r"""MagMax: per coordinate, the task-vector entry of largest magnitude.

.. math::
    \tau_i = \lambda\, \tau_{t^\ast(i),\,i}, \qquad t^\ast(i) = \arg\max_t |\tau_{t,i}|

(sign kept; on a tie the later task wins, as in the official code). Made for continual learning,
where :math:`\tau_t` is the change of the sequentially fine-tuned model after task :math:`t`.

Reference:
    D. Marczak, B. Twardowski, T. Trzciński, S. Cygert. "MagMax: Leveraging Model Merging for
    Seamless Continual Learning." ECCV 2024. arXiv:2407.06322.
"""

from __future__ import annotations

from torch import Tensor

from compolab.merging._common import Taus, check_taus, stack

__all__ = ["magmax"]


def magmax(taus: Taus, *, scale: float = 1.0) -> dict[str, Tensor]:
    r""":math:`\lambda\,\tau_{t^\ast(i), i}` with :math:`t^\ast(i) = \arg\max_t |\tau_{t,i}|`.

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes.
        scale: :math:`\lambda` (the official reproduction uses 0.5 for independent fine-tunes).

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``.

    Raises:
        ConfigError: If ``taus`` is empty or mismatched.

    Examples:
        >>> import torch
        >>> taus = [{"w": torch.tensor([1.0, -4.0, 2.0])}, {"w": torch.tensor([-3.0, 2.0, -2.0])}]
        >>> magmax(taus)["w"]  # a tie goes to the later task
        tensor([-3., -4., -2.])
    """
    keys = check_taus(taus)
    merged = {}
    for k in keys:
        values = stack(taus, k)  # (T, *shape)
        last = len(taus) - 1 - values.abs().flip(0).argmax(0, keepdim=True)  # the later task on a tie
        merged[k] = scale * values.gather(0, last).squeeze(0)
    return merged
