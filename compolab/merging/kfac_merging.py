r"""K-FAC merging: Fisher merging with each task's Kronecker-factored Fisher in place of its diagonal.

For a linear weight :math:`W` (out × in) with per-task factors :math:`\bar F_t \approx A_t \otimes G_t`
(:class:`~compolab.kfac.KFAC`, A ``(in, in)``, G ``(out, out)``) and weights :math:`w_t` that sum to 1,

.. math::
    \tau = \arg\min_\tau \sum_t w_t\, (\tau - \tau_t)^\top (A_t \otimes G_t + \delta I)(\tau - \tau_t)
    \iff \sum_t w_t\, G_t W A_t + \delta W = \sum_t w_t\, G_t W_t A_t + \delta \sum_t w_t W_t

(:math:`(A \otimes G)\,\mathrm{vec}(W) = \mathrm{vec}(G W A)`, column-major vec), a generalised
Sylvester equation. It is solved per weight, matrix-free (never the (in·out)² matrix), by conjugate
gradients on the SPD operator :math:`W \mapsto \sum_t w_t G_t W A_t + \delta W`, in float64, warm-started
at the weighted mean :math:`\sum_t w_t \tau_t` and preconditioned by the inverse of
:math:`\bar A \otimes \bar G + \delta I` (:math:`\bar A = \sum_t w_t A_t`, :math:`\bar G = \sum_t w_t G_t`;
a division in their eigenbases, where the iterations run; exact for one task or a common factor pair).

**Damping.** :math:`\delta = \text{damping} \cdot \mathrm{tr}\big(\sum_t w_t A_t \otimes G_t\big) /
(\text{in} \cdot \text{out}) = \text{damping} \cdot \sum_t w_t\, \mathrm{tr} A_t\, \mathrm{tr} G_t /
(\text{in}\cdot\text{out})`, relative to the mean diagonal entry of the weighted curvature, is added to
every task's curvature. Like Fisher merging's ``floor``, it gives a direction that no task's curvature
sees the weighted mean of the :math:`\tau_t` (not 0), and large damping tends to that mean. With
diagonal factors the merge is Fisher merging with :math:`F_t = \mathrm{diag}(G_t)\,\mathrm{diag}(A_t)^\top
+ \delta`; with one task it is :math:`\tau_0`.

**No data.** The merge reads the task vectors and each task's factors only: the factors are the
shareable curvature (``compolab stats --kind kfac``), so neither this merge nor a later ITA-KFAC task
needs any data of the earlier tasks.

References:
    M. Matena, C. Raffel. "Merging Models with Fisher-Weighted Averaging." NeurIPS 2022.
    J. Martens, R. Grosse. "Optimizing Neural Networks with Kronecker-factored Approximate Curvature."
    ICML 2015. D. Tam, M. Bansal, C. Raffel. "Merging by Matching Models in Task Parameter Subspaces."
    TMLR 2024 (the same linear system, solved by conjugate gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from compolab.errors import CompolabError, ConfigError
from compolab.kfac import KFAC
from compolab.merging._common import Taus, check_aligned, check_in, check_taus

__all__ = ["kfac_merging"]


def _check_kfacs(kfacs: Sequence[KFAC], taus: Taus, keys: Sequence[str]) -> None:
    check_aligned("kfacs", kfacs, taus)
    for t, kfac in enumerate(kfacs):
        if not isinstance(kfac, KFAC):
            raise ConfigError(f"`kfacs`: entry {t} is a {type(kfac).__name__}, not a KFAC")
        missing = [k for k in keys if k not in kfac.factors]
        if missing:
            raise ConfigError(f"`kfacs`: the K-FAC of task {t} has no factors for {missing} (K-FAC covers "
                              "the 2-D weights of linear layers only)")  # fmt: skip
        shapes = [f"{k} {tuple(taus[t][k].shape)} vs (G, A) {(g.shape[0], a.shape[0])}"
                  for k in keys for a, g in [kfac.factors[k]]
                  if tuple(taus[t][k].shape) != (g.shape[0], a.shape[0])]  # fmt: skip
        if shapes:
            raise ConfigError(f"`kfacs`: the factors of task {t} do not fit the task vector: {shapes}")
        bad = [k for k in keys for f in kfac.factors[k] if not _psd_like(f)]
        if bad:
            raise ConfigError(f"`kfacs`: the factors of task {t} are not finite, symmetric and with a "
                              f"non-negative diagonal for {sorted(set(bad))}")  # fmt: skip


def _psd_like(f: Tensor) -> bool:
    """Finite, symmetric up to rounding, non-negative diagonal (the cheap necessary conditions of PSD)."""
    f = f.double()
    if not bool(torch.isfinite(f).all()) or bool((f.diagonal() < 0).any()):
        return False
    return bool((f - f.T).abs().max() <= 1e-5 * f.abs().max())


def _solve(pairs: list[tuple[Tensor, Tensor]], weights: list[float], rhs_taus: list[Tensor], damping: float,
           tol: float, max_iter: int, key: str) -> Tensor:  # fmt: skip
    """Preconditioned CG for :math:`\\sum_t w_t G_t W A_t + \\delta W = \\sum_t w_t G_t W_t A_t +
    \\delta \\bar W` (float64 inputs, the weights summing to 1), run in the eigenbases of :math:`\\bar A`
    and :math:`\\bar G`, where the preconditioner is a division (an orthogonal change of basis: the same
    residual norms)."""
    out, inp = rhs_taus[0].shape
    w = torch.tensor(weights, dtype=torch.float64, device=rhs_taus[0].device)
    a = torch.stack([a for a, _ in pairs])  # (T, in, in)
    g = torch.stack([g for _, g in pairs])  # (T, out, out)
    x_t = torch.stack(rhs_taus)  # (T, out, in)
    traces = a.diagonal(dim1=1, dim2=2).sum(1) * g.diagonal(dim1=1, dim2=2).sum(1)  # tr(A_t ⊗ G_t)
    delta = damping * float((w * traces).sum()) / (out * inp)
    mean = torch.einsum("t,toi->oi", w, x_t)
    if delta == 0.0:  # every factor is 0: no curvature anywhere, the weighted mean (as Fisher's floor)
        return mean
    lam_a, q_a = torch.linalg.eigh(torch.einsum("t,tij->ij", w, a))
    lam_g, q_g = torch.linalg.eigh(torch.einsum("t,tij->ij", w, g))
    a = q_a.T @ a @ q_a
    g = w[:, None, None] * (q_g.T @ g @ q_g)  # rotated, each G_t carrying its weight
    scale = lam_g.clamp(min=0)[:, None] * lam_a.clamp(min=0)[None, :] + delta  # Ā ⊗ Ḡ + δI, diagonal

    def operator(x: Tensor) -> Tensor:
        return (g @ x @ a).sum(0) + delta * x

    rotated_mean = q_g.T @ mean @ q_a
    b = (g @ (q_g.T @ x_t @ q_a) @ a).sum(0) + delta * rotated_mean
    x, threshold = rotated_mean, tol * float(b.norm())
    r = b - operator(x)
    z = r / scale
    p, rz = z, float((r * z).sum())
    for _ in range(max_iter):
        if float(r.norm()) <= threshold:
            break
        mp = operator(p)
        step = rz / float((p * mp).sum())
        x, r = x + step * p, r - step * mp
        z = r / scale
        rz, previous = float((r * z).sum()), rz
        p = z + (rz / previous) * p
    if float(r.norm()) > threshold:
        raise CompolabError(f"kfac_merging: conjugate gradients did not reach `tol` {tol} for {key!r} in "
                            f"{max_iter} iterations (relative residual {float(r.norm() / b.norm()):.2e}); "
                            "raise `max_iter` or `damping`")  # fmt: skip
    return q_g @ x @ q_a.T


def kfac_merging(
    taus: Taus,
    *,
    kfacs: Sequence[KFAC],
    coefs: Sequence[float] | None = None,
    damping: float = 1e-3,
    tol: float = 1e-6,
    max_iter: int = 1000,
) -> dict[str, Tensor]:
    r"""The K-FAC-weighted merge of the module docstring, weight by weight.

    Args:
        taus: The task vectors :math:`\tau_t`, same keys, shapes and dtypes; every key a 2-D weight.
        kfacs: One :class:`~compolab.kfac.KFAC` per task vector (e.g. the pool's ``kfac`` statistics at
            :math:`\theta_0 + \tau_t`) with factors for every key of ``taus`` (extra ones are ignored).
        coefs: The model weights :math:`w_t > 0`; default equal (normalised to sum to 1).
        damping: :math:`\delta` relative to the mean diagonal entry of the weighted curvature (> 0).
        tol: Conjugate gradients stop at a residual norm ``tol`` × that of the right-hand side (> 0).
        max_iter: At most this many iterations per weight (>= 1).

    Returns:
        The merged :math:`\tau`, keyed like ``taus[0]``, in its dtype (computed in float64).

    Raises:
        ConfigError: Before any work, if ``taus`` is empty or mismatched; ``kfacs`` or ``coefs`` has the
            wrong length; a K-FAC lacks factors for a key (named) or its factors do not fit the key's
            shape or are not finite / symmetric; or a coefficient, ``damping``, ``tol`` or ``max_iter``
            is out of range.
        CompolabError: If conjugate gradients miss ``tol`` within ``max_iter`` iterations (named key).

    Examples:
        >>> import torch
        >>> from compolab.kfac import KFAC
        >>> one = lambda g: KFAC({"w": (torch.eye(1), torch.tensor([[g]]))}, num_samples=1)
        >>> taus = [{"w": torch.tensor([[1.0]])}, {"w": torch.tensor([[4.0]])}]
        >>> kfac_merging(taus, kfacs=[one(3.0), one(1.0)], damping=1e-12)["w"]  # (3 * 1 + 1 * 4) / 4
        tensor([[1.7500]])
    """
    keys = check_taus(taus)
    _check_kfacs(kfacs, taus, keys)
    coefs = [1.0] * len(taus) if coefs is None else list(coefs)
    check_aligned("coefs", coefs, taus)
    for w in coefs:
        check_in("coefs", w, "(0, inf)")
    check_in("damping", damping, "(0, inf)")
    check_in("tol", tol, "(0, inf)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"`max_iter` must be an integer >= 1, got {max_iter!r}")
    weights = [w / sum(coefs) for w in coefs]
    merged = {}
    for k in keys:
        like = {"device": taus[0][k].device, "dtype": torch.float64}
        pairs = [(kf.factors[k][0].to(**like), kf.factors[k][1].to(**like)) for kf in kfacs]
        pairs = [((a + a.T) / 2, (g + g.T) / 2) for a, g in pairs]  # exactly symmetric: CG needs it
        solution = _solve(pairs, weights, [tau[k].to(**like) for tau in taus], damping, tol, max_iter, k)
        merged[k] = solution.to(taus[0][k].dtype)
    return merged
