r"""The curvatures C of the probes' second-order view, compared on one loss: exact, K-FAC, diagonal.

Every quadratic the probes predict — the parabola along a module (:func:`~compolab.probes.second_order`),
the Jensen-gap estimate Ω (:func:`~compolab.probes.jensen_gap`), the explorer's quadratic model — needs
:math:`\tau_s^\top C \tau_t` for the modules. Three choices of C, all at θ0 and for the probes'
multi-task loss ℓ (the pool's heads concatenated, every probe image):

* ``"fisher"``: the Fisher **exact on the modules' span**,
  :math:`\tau_s^\top F \tau_t = \frac1N\sum_n (J_n\tau_s)^\top \nabla^2_z\ell_n\,(J_n\tau_t)`, from
  one forward-mode pass per module (no approximation: for cross-entropy the generalised Gauss–Newton
  matrix is the true Fisher);
* ``"kfac"``: the K-FAC of that Fisher, :math:`\sum_W \mathrm{tr}(\Delta W_s^\top G\,\Delta W_t A)`
  (:mod:`compolab.kfac`): per-layer blocks, each a Kronecker product — no cross-layer terms;
* ``"diagonal"``: its diagonal :math:`\sum_i F_{ii}\,\tau_{s,i}\tau_{t,i}`, the paper's proxy of Eq. 12.

:func:`probe_curvature` computes the last two **on the probe images** (the true Fisher, or its
unbiased Monte-Carlo estimate with sampled labels, which costs ``mc_samples`` backward passes per
image instead of one per class), so that the three differ only by their approximation;
:func:`curvature_gram` gives the matrix :math:`(\tau_s^\top C\tau_t)_{st}` of either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from compolab.errors import ConfigError
from compolab.fisher import diagonal_fisher
from compolab.fisher_store import DiagonalFisher
from compolab.kfac import KFAC, kfac_at
from compolab.probes.engine import ProbeData, batches

__all__ = ["PROBE_CURVATURES", "Curvature", "probe_curvature", "curvature_gram", "curvature_kind"]

#: The curvatures of the probes, from the most exact to the coarsest.
PROBE_CURVATURES = ("fisher", "kfac", "diagonal")
#: A curvature object of the probes: a diagonal Fisher or a K-FAC (``"fisher"`` needs none).
Curvature = DiagonalFisher | KFAC


def curvature_kind(curvature: str | Curvature) -> str:
    """``"fisher"``, ``"kfac"``, ``"diagonal"`` (or ``"hessian"``) for a curvature or its name.

    Raises:
        ConfigError: For anything else.
    """
    if isinstance(curvature, KFAC):
        return "kfac"
    if isinstance(curvature, DiagonalFisher):
        return "diagonal"
    if curvature in ("fisher", "hessian"):
        return curvature
    raise ConfigError(f"curvature must be 'fisher', 'hessian', a DiagonalFisher or a KFAC, got {curvature!r}")


def probe_curvature(
    kind: str,
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    head: nn.Module,
    data: ProbeData,
    *,
    fisher_type: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> Curvature:
    r"""The ``"diagonal"`` or ``"kfac"`` curvature of the probes' loss at θ0, on ``data``'s images.

    Both are the Fisher of ``head(backbone(x))`` over every image of ``data`` (the mean over images:
    with equal images per task, the mean over tasks of the probes), at ``theta0``, for the weights of
    ``theta0``: the true one (``fisher_type="exact"``: the kit's exact diagonal, curvlinops'
    ``"type-2"`` K-FAC; one backward pass per class) or its Monte-Carlo estimate (``"mc"``:
    ``mc_samples`` labels drawn per image from the model, seeded).

    Args:
        kind: ``"diagonal"`` or ``"kfac"``.
        backbone: θ0's model.
        theta0: θ0's tuned weights (the modules' names).
        head: The pool's heads (fixed); the softmax runs over all its outputs.
        data: The probe images.
        fisher_type: ``"exact"`` or ``"mc"``.
        mc_samples: Labels per image for ``"mc"``.
        seed: Seed of the sampled labels.
        batch_size: Images per batch.

    Raises:
        ConfigError: An unknown kind (or what :func:`~compolab.kfac.kfac_at` raises).
        CompolabError: ``"kfac"`` without curvlinops.
    """
    if kind not in ("diagonal", "kfac"):
        raise ConfigError(f"probe_curvature computes 'diagonal' or 'kfac', got {kind!r}")
    if fisher_type not in ("exact", "mc"):
        raise ConfigError(f"`fisher_type` must be 'exact' or 'mc', got {fisher_type!r}")
    like = next(iter(theta0.values()))
    loader = [(x.to(like.device), y.to(like.device)) for t in data.tasks
              for x, y in batches(data.x[t], data.y[t], batch_size)]  # fmt: skip
    names, params = list(theta0), dict(theta0)
    mc = {"mc_samples": mc_samples} if fisher_type == "mc" else {}
    if kind == "diagonal":
        gen = torch.Generator(like.device).manual_seed(seed) if fisher_type == "mc" else None
        return diagonal_fisher(backbone, head, loader, names=names, kind=fisher_type, params=params,
                               generator=gen, **mc)  # fmt: skip
    return kfac_at(backbone, head, loader, names, fisher_type=fisher_type, params=params, seed=seed, **mc)


def curvature_gram(curvature: Curvature, taus: Sequence[Mapping[str, Tensor]]) -> Tensor:
    r"""``(T, T)`` float64 :math:`(\tau_s^\top C\,\tau_t)_{st}` for a diagonal Fisher (per-sample mean)
    or a K-FAC, over the weights of the modules.

    Raises:
        ConfigError: A module weight the curvature does not cover, or not a curvature.

    Examples:
        >>> fisher = DiagonalFisher({"w": torch.tensor([2.0, 4.0])}, num_samples=2)   # mean [1, 2]
        >>> curvature_gram(fisher, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}])
        tensor([[1., 1.],
                [1., 3.]], dtype=torch.float64)
    """
    kind = curvature_kind(curvature)
    if kind not in ("diagonal", "kfac"):
        raise ConfigError(f"curvature_gram needs a DiagonalFisher or a KFAC, got {kind!r}")
    names = sorted({n for tau in taus for n in tau})
    covered = curvature.factors if isinstance(curvature, KFAC) else curvature.mean()
    missing = [n for n in names if n not in covered]
    if missing:
        raise ConfigError(f"the {kind} curvature does not cover the module weights {missing}")
    gram = torch.zeros(len(taus), len(taus), dtype=torch.float64)
    for name in names:
        ds = [tau[name].double() if name in tau else None for tau in taus]
        if isinstance(curvature, KFAC):
            cs = [None if d is None else curvature.matvec(name, d) for d in ds]
        else:
            f = covered[name].double()
            cs = [None if d is None else f.to(d.device) * d for d in ds]
        for s, a in enumerate(ds):
            for t, c in enumerate(cs):
                if a is not None and c is not None:
                    gram[s, t] += float((a * c).sum())
    return gram
