r"""RegMean: merge each linear layer to match every model's outputs on its own inputs.

For a linear weight :math:`W \in \mathbb{R}^{\text{out}\times\text{in}}` with input Gram matrices
:math:`G_t = X_t^\top X_t \in \mathbb{R}^{\text{in}\times\text{in}}`,

.. math::
    W^\ast = \arg\min_W \sum_t \lVert X_t W^\top - X_t W_t^\top \rVert^2
           = \Big(\sum_t W_t \tilde G_t\Big)\Big(\sum_t \tilde G_t\Big)^{-1},
    \qquad \tilde G_t = \alpha G_t + (1 - \alpha) \operatorname{diag}(G_t).

RegMean is stated on weights :math:`W_t = \theta_0 + \tau_t`, but it is linear in them with
weights that sum to the identity, so :math:`\theta_0` cancels exactly and the merge is computed
in :math:`\tau` form, :math:`\tau^\ast = (\sum_t \tau_t \tilde G_t)(\sum_t \tilde G_t)^{-1}`
(no subtraction of large weights, no :math:`\theta_0` needed). Parameters without a Gram are
averaged, as in the paper.

Reference:
    X. Jin, X. Ren, D. Preotiuc-Pietro, P. Cheng. "Dataless Knowledge Fusion by Merging Weights
    of Language Models." ICLR 2023. arXiv:2212.09849.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from compolab.errors import ConfigError
from compolab.merging._common import Taus, check_aligned, check_in, check_taus, linalg_dtype, stack
from compolab.task_vector import key_mismatch

__all__ = ["regmean"]


def _check_grams(grams: Sequence[Mapping[str, Tensor]], taus: Taus) -> None:
    check_aligned("grams", grams, taus)
    for t, gram in enumerate(grams):
        if problem := key_mismatch(grams[0], gram):
            raise ConfigError(f"`grams`: task {t} does not match task 0: {problem}")
    for k, g in grams[0].items():
        if k not in taus[0] or taus[0][k].ndim != 2:
            raise ConfigError(f"`grams` has a Gram for {k!r}, which is not a 2-D weight of `taus`")
        n_in = taus[0][k].shape[1]
        if g.shape != (n_in, n_in):
            raise ConfigError(
                f"`grams`: the Gram of {k!r} has shape {tuple(g.shape)}, expected ({n_in}, {n_in}) "
                f"for a weight of shape {tuple(taus[0][k].shape)}"
            )


def regmean(taus: Taus, *, grams: Sequence[Mapping[str, Tensor]], alpha: float = 0.9) -> dict[str, Tensor]:
    r""":math:`(\sum_t \tau_t \tilde G_t)(\sum_t \tilde G_t)^{-1}` per weight with a Gram, else the mean.

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes.
        grams: One ``weight name -> G_t`` mapping per task, with the same names for every task;
            :math:`G_t = X_t^\top X_t` is ``(in, in)`` for an ``(out, in)`` weight of ``taus``.
        alpha: :math:`\alpha \in [0, 1]`, the scaling of the Grams' off-diagonal entries
            (1: exact RegMean; 0: a per-input-feature weighted mean).

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``.

    Raises:
        ConfigError: If ``taus`` is empty or mismatched; ``grams`` has the wrong length, names
            that differ between tasks, a Gram of a name that is not a 2-D weight or of the wrong
            shape; ``alpha`` is outside [0, 1]; or the summed Grams of a weight are singular.

    Examples:
        >>> import torch
        >>> taus = [{"w": torch.tensor([[1.0, 0.0]])}, {"w": torch.tensor([[3.0, 2.0]])}]
        >>> grams = [{"w": torch.diag(torch.tensor([3.0, 1.0]))}, {"w": torch.eye(2)}]
        >>> regmean(taus, grams=grams)["w"]  # (1*3 + 3*1) / 4, (0*1 + 2*1) / 2
        tensor([[1.5000, 1.0000]])
    """
    keys = check_taus(taus)
    _check_grams(grams, taus)
    check_in("alpha", alpha, "[0, 1]")
    merged = {}
    for k in keys:
        if k not in grams[0]:
            merged[k] = stack(taus, k).mean(0)
            continue
        like = {"device": taus[0][k].device, "dtype": linalg_dtype(taus[0][k])}
        shrunk = [
            alpha * g[k].to(**like) + (1 - alpha) * torch.diag(g[k].diagonal().to(**like)) for g in grams
        ]
        rhs = sum(tau[k].to(like["dtype"]) @ g for tau, g in zip(taus, shrunk, strict=True))
        try:
            solution = torch.linalg.solve(sum(shrunk), rhs, left=False)  # rhs @ (sum G)^-1
        except torch.linalg.LinAlgError:
            raise ConfigError(
                f"`grams`: the summed Grams of {k!r} are singular (an input feature no task saw, or "
                f"`alpha` = 1 with fewer samples than inputs)"
            ) from None
        merged[k] = solution.to(taus[0][k].dtype)
    return merged
