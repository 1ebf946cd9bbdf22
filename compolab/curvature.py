"""Curvature of a loss in parameter space: Hessian-vector products, top eigenvalues, trace, diagonals.

Everything works on a *loss closure* ``loss_fn(params) -> scalar`` over a dict of named tensors,
built with ``torch.func.functional_call`` (:func:`make_loss_fn`), so the same code serves any model
and any subset of its parameters.

Second derivatives need attention kernels that support double backward and forward-mode AD; the
fused ones (flash / memory-efficient SDPA) do not: :func:`hvp` and the functions built on it select
the MATH backend themselves (:func:`compolab.models.math_attention` also turns timm's ``fused_attn`` off).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from compolab.errors import ConfigError
from compolab.models import math_attention  # noqa: F401  (re-exported: compolab.probes imports it here)

__all__ = [
    "LossFn",
    "TraceEstimate",
    "make_loss_fn",
    "hvp",
    "top_eigenvalues",
    "hutchinson_trace",
    "dense_hessian",
    "hessian_diagonal_exact",
    "ggn_diagonal",
]

LossFn = Callable[[dict[str, Tensor]], Tensor]


def make_loss_fn(
    model: nn.Module, inputs: Tensor, targets: Tensor, *, names: Sequence[str] | None = None
) -> tuple[LossFn, dict[str, Tensor]]:
    """Mean cross-entropy of ``model`` on one batch as a function of some of its parameters.

    Args:
        model: Maps ``inputs`` to logits.
        inputs: The batch.
        targets: Class indices (logit columns).
        names: Parameters to vary; default: every parameter.

    Returns:
        ``(loss_fn, params)``: the closure and detached copies of the chosen parameters (the point
        to evaluate at); the other parameters stay the module's own.

    Raises:
        ConfigError: If a name is not a parameter of ``model``.
    """
    own = dict(model.named_parameters())
    names = list(own) if names is None else list(names)
    if unknown := [n for n in names if n not in own]:
        raise ConfigError(f"names not among the model's parameters: {unknown}")
    params = {n: own[n].detach().clone() for n in names}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (inputs,)), targets)

    return loss_fn, params


def _flatten(tensors: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def _unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, t in like.items():
        out[k] = flat[i : i + t.numel()].view_as(t)
        i += t.numel()
    return out


def hvp(
    loss_fn: LossFn, params: dict[str, Tensor], v: Mapping[str, Tensor], *, mode: str = "rev"
) -> dict[str, Tensor]:
    """Hessian-vector product :math:`H v` with :math:`H = \\nabla^2_\\theta \\ell(\\theta)` at ``params``.

    Args:
        loss_fn: ``params -> scalar``.
        params: The point :math:`\\theta`.
        v: The direction, keyed like ``params``.
        mode: ``"rev"`` (reverse-over-reverse, ``vjp(grad)``: the faster one on CPU) or ``"fwd"``
            (forward-over-reverse, ``jvp(grad)``).

    Returns:
        :math:`H v`, keyed like ``params``.

    Examples:
        >>> import torch
        >>> loss = lambda p: (p["x"] ** 3).sum()  # H = diag(6 x)
        >>> hvp(loss, {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([1.0, 1.0])})["x"]
        tensor([ 6., 12.])
    """
    if set(v) != set(params):
        raise ConfigError(f"v and params differ in keys: {sorted(set(v) ^ set(params))}")
    v = {k: v[k].to(params[k]) for k in params}
    # no_grad: the transforms ignore it, but the result then carries no graph through the model's
    # *other* trainable parameters (hessian_diagonal_exact would chain one graph per chunk).
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        if mode == "rev":
            _, pullback = vjp(grad(loss_fn), params)
            return pullback(v)[0]
        if mode == "fwd":
            return jvp(grad(loss_fn), (params,), (v,))[1]
    raise ConfigError(f"mode must be 'rev' or 'fwd', got {mode!r}")


def top_eigenvalues(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
) -> Tensor:
    """The ``k`` extreme eigenvalues of the Hessian, by ARPACK Lanczos (``scipy.sparse.linalg.eigsh``).

    Only Hessian-vector products are used (one per Lanczos step), never the matrix.

    Args:
        loss_fn: ``params -> scalar``.
        params: The point.
        k: How many eigenvalues (fewer than the number of parameters).
        which: ``"LA"`` (largest algebraic), ``"SA"`` (smallest) or ``"LM"`` (largest magnitude).
        tol: Relative accuracy of the eigenvalues (``0`` = machine precision).
        max_iter: Lanczos restarts allowed (scipy's default if None).
        seed: Seed of the start vector.

    Returns:
        ``(k,)`` float64 eigenvalues, in decreasing order.

    Examples:
        >>> import torch
        >>> loss = lambda p: 0.5 * (torch.tensor([1.0, 2.0, 3.0]) * p["x"] ** 2).sum()  # H = diag(1, 2, 3)
        >>> top_eigenvalues(loss, {"x": torch.zeros(3)}, k=2).round(decimals=4).tolist()
        [3.0, 2.0]
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    n = sum(t.numel() for t in params.values())
    if not 0 < k < n:
        raise ConfigError(f"k must be in [1, {n - 1}] for {n} parameters, got {k}")
    like = next(iter(params.values()))

    def matvec(x) -> object:
        v = _unflatten(torch.as_tensor(x.reshape(-1), dtype=like.dtype, device=like.device), params)
        return _flatten(hvp(loss_fn, params, v)).detach().double().cpu().numpy()

    op = LinearOperator((n, n), matvec=matvec, dtype="float64")
    start = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    values = eigsh(op, k=k, which=which, tol=tol, maxiter=max_iter, v0=start, return_eigenvectors=False)
    return torch.as_tensor(values).sort(descending=True).values


@dataclass(frozen=True)
class TraceEstimate:
    """A Monte-Carlo trace estimate.

    Attributes:
        value: The mean of the probes' :math:`z^\\top H z`.
        std_error: Its standard error (sample std / sqrt(n)).
        samples: The per-probe values.
    """

    value: float
    std_error: float
    samples: Tensor


def hutchinson_trace(
    loss_fn: LossFn, params: dict[str, Tensor], n_probes: int, *, seed: int = 0
) -> TraceEstimate:
    """Hutchinson's estimate :math:`\\mathrm{tr}\\, H \\approx \\frac{1}{m} \\sum_j z_j^\\top H z_j`.

    Rademacher probes :math:`z_j \\in \\{\\pm 1\\}^P`, one Hessian-vector product each; unbiased, with
    variance :math:`2 \\sum_{i \\ne j} H_{ij}^2` per probe.

    Args:
        loss_fn: ``params -> scalar``.
        params: The point.
        n_probes: Number of probes :math:`m` (at least 2, for the standard error).
        seed: Seed of the probes.

    Examples:
        A diagonal Hessian is estimated exactly by every Rademacher probe (:math:`z_i^2 = 1`):

        >>> import torch
        >>> loss = lambda p: 0.5 * (torch.tensor([1.0, 2.0, 3.0]) * p["x"] ** 2).sum()
        >>> est = hutchinson_trace(loss, {"x": torch.zeros(3)}, n_probes=4)
        >>> est.value, est.std_error
        (6.0, 0.0)
    """
    if n_probes < 2:
        raise ConfigError(f"n_probes must be >= 2, got {n_probes}")
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_probes):
        z = {k: (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t) for k, t in params.items()}
        hz = hvp(loss_fn, params, z)
        samples.append(sum(float((z[k] * hz[k]).sum()) for k in params))
    s = torch.tensor(samples, dtype=torch.float64)
    return TraceEstimate(float(s.mean()), float(s.std() / n_probes**0.5), s)


def dense_hessian(loss_fn: LossFn, params: dict[str, Tensor]) -> Tensor:
    """The full Hessian ``(P, P)`` in the flattened order of ``params`` (tiny models only)."""
    flat = _flatten(params).detach()
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():  # no graph through other parameters
        return torch.func.hessian(lambda x: loss_fn(_unflatten(x, params)))(flat)


def hessian_diagonal_exact(
    loss_fn: LossFn, params: dict[str, Tensor], *, chunk: int = 64
) -> dict[str, Tensor]:
    """The exact Hessian diagonal, one Hessian-vector product per parameter (tiny models only).

    Args:
        loss_fn: ``params -> scalar``.
        params: The point.
        chunk: Basis vectors per ``vmap``-ed batch of products.
    """
    n = sum(t.numel() for t in params.values())
    like = next(iter(params.values()))
    diag = torch.empty(n, dtype=like.dtype, device=like.device)

    def column(e: Tensor) -> Tensor:
        return _flatten(hvp(loss_fn, params, _unflatten(e, params)))

    for s in range(0, n, chunk):
        idx = torch.arange(s, min(n, s + chunk), device=like.device)
        basis = torch.zeros(len(idx), n, dtype=like.dtype, device=like.device)
        basis[torch.arange(len(idx)), idx] = 1
        diag[idx] = torch.func.vmap(column)(basis)[torch.arange(len(idx)), idx]
    return _unflatten(diag, params)


def ggn_diagonal(backbone: nn.Module, head: nn.Module | None, loader, **kwargs) -> dict[str, Tensor]:
    """Diagonal of the generalised Gauss–Newton matrix of the mean cross-entropy.

    For softmax cross-entropy :math:`G = \\frac{1}{N}\\sum_n J_n^\\top (\\mathrm{diag}\\,p_n - p_n p_n^\\top)
    J_n` equals the mean true Fisher, so this is :func:`compolab.fisher.diagonal_fisher` (``kind="exact"``)
    divided by the number of samples.

    Args:
        backbone, head, loader: As for :func:`~compolab.fisher.diagonal_fisher`.
        **kwargs: Passed on (``names``, ``include_head``, ``params``, ...).
    """
    from compolab.fisher import diagonal_fisher

    return diagonal_fisher(backbone, head, loader, kind="exact", **kwargs).mean()
