r"""The second-order prediction of a 1-D curve from θ0 alone (the paper's expansion around θ0, Eq. 2).

Along :math:`\phi(\lambda) = \ell(\theta_0 + \lambda\tau)` the prediction is

.. math:: \hat\ell(\lambda) = \ell(\theta_0) + \lambda\, g^\top\tau + \tfrac12 \lambda^2\, \tau^\top C \tau ,

with the first-order term measured at θ0 (the paper assumes it vanishes) and C the Fisher (exact
along τ), the Hessian, a K-FAC, or the diagonal Fisher the paper uses as a proxy (Eq. 12)
(:mod:`~compolab.probes.curvatures`).

Second derivatives are taken forward-over-reverse (``jvp(grad(·))``): in torch 2.14 the
forward-over-forward derivative of ``layer_norm`` is wrong (tests/test_probes.py checks the
forward-over-reverse one against finite differences).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from tqdm.auto import tqdm

from compolab.curvature import math_attention
from compolab.kfac import KFAC
from compolab.linearize import linearized_forward
from compolab.probes.curvatures import Curvature, curvature_kind
from compolab.probes.engine import (
    Criterion,
    ProbeData,
    batches,
    check_directions,
    cross_entropy,
    int_keys,
    mean_over,
)
from compolab.probes.paths import DEFAULT_LAMBDAS

__all__ = ["SecondOrder", "second_order"]


def scalar_derivatives(fn: Callable[[Tensor], Tensor], like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(fn(0), fn'(0), fn''(0))`` of a scalar function, the second one forward-over-reverse.

    Examples:
        >>> scalar_derivatives(lambda s: (s + 1) ** 3, torch.zeros(()))
        (tensor(1.), tensor(3.), tensor(6.))
    """
    s, one = (
        torch.zeros((), dtype=like.dtype, device=like.device),
        torch.ones((), dtype=like.dtype, device=like.device),
    )
    value, first = jvp(fn, (s,), (one,))
    second = jvp(grad(fn), (s,), (one,))[1]
    return value.detach(), first.detach(), second.detach()


def output_jvp(
    backbone: nn.Module, head: nn.Module, theta0: Mapping[str, Tensor], names: Sequence[str],
    tau: Mapping[str, Tensor], x: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(z0, J τ)``: outputs at θ0 and their derivative along τ (the head is fixed: zero tangent)."""
    tangent = {n: tau[n].to(theta0[n]) for n in names}
    return linearized_forward(backbone, theta0, tangent, x, head=head)


@dataclass
class SecondOrder:
    r"""The quadratic prediction :math:`\hat\ell(\lambda) = \ell(\theta_0) + \lambda\,s + \tfrac12\lambda^2 q`
    of a curve, per task.

    Attributes:
        loss0: ``{task: ℓ(θ0)}``.
        slope: ``{task: s = gᵀτ}``, the first-order term measured at θ0.
        curvature: ``{task: q = τᵀCτ}``.
        kind: C: ``"fisher"`` (exact along τ; the generalised Gauss–Newton for other criteria),
            ``"hessian"``, ``"kfac"`` or ``"diagonal"`` (a diagonal Fisher).
        label: Name of the direction.
    """

    loss0: dict[int, float]
    slope: dict[int, float]
    curvature: dict[int, float]
    kind: str = "fisher"
    label: str = "τ"

    def predict(self, lambdas: Sequence[float], tasks: Sequence[int] | None = None) -> list[float]:
        """The mean over ``tasks`` (default all) of the predicted loss at each λ.

        Examples:
            >>> SecondOrder({0: 1.0}, {0: 0.0}, {0: 2.0}).predict([0.0, 1.0, 2.0])
            [1.0, 2.0, 5.0]
        """
        lams = [float(v) for v in lambdas]
        values = {
            t: [self.loss0[t] + lam * self.slope[t] + 0.5 * lam**2 * self.curvature[t] for lam in lams]
            for t in self.loss0
        }
        return mean_over(values, tasks)

    def plot(self, ax=None, lambdas: Sequence[float] = DEFAULT_LAMBDAS, *, tasks: Sequence[int] | None = None,
             **kwargs):  # fmt: skip
        """The predicted curve (dashed by default); returns ``ax``."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        kwargs.setdefault("ls", "--")
        kwargs.setdefault("label", f"{self.label}: second order ({self.kind})")
        ax.plot(list(lambdas), self.predict(lambdas, tasks), **kwargs)
        return ax

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {"kind": "second_order", **asdict(self), "curvature_kind": self.kind}

    @classmethod
    def from_json(cls, data: Mapping) -> SecondOrder:
        """Read :meth:`to_json`'s output."""
        return cls(int_keys(data["loss0"]), int_keys(data["slope"]), int_keys(data["curvature"]),
                   data.get("curvature_kind", "fisher"), data.get("label", "τ"))  # fmt: skip


def second_order(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    data: ProbeData,
    head: nn.Module,
    *,
    curvature: str | Curvature = "fisher",
    label: str = "τ",
    criterion: Criterion = cross_entropy,
    batch_size: int = 256,
    progress: bool | None = True,
) -> SecondOrder:
    r"""Predict the curve :math:`\ell(\theta_0 + \lambda\tau)` of each task from θ0 (Eq. 2).

    With :math:`\phi(\lambda) = \ell(\theta_0+\lambda\tau)`, the prediction is
    :math:`\phi(0) + \lambda\phi'(0) + \tfrac12\lambda^2 q`; :math:`\phi'(0) = g^\top\tau` is
    measured exactly (one forward-mode pass gives the outputs' derivative :math:`J\tau`), and q is

    * ``"fisher"``: :math:`\tau^\top F\tau = \frac1N\sum_n (J_n\tau)^\top \nabla^2_z\ell_n\,(J_n\tau)`,
      the Fisher along τ, exact (no diagonal): for cross-entropy the generalised Gauss–Newton
      matrix *is* the true Fisher;
    * ``"hessian"``: :math:`\tau^\top H\tau = \phi''(0)` (forward-over-reverse through the model);
    * a :class:`~compolab.fisher_store.DiagonalFisher`: :math:`\sum_i \bar F_i\tau_i^2`, the
      paper's proxy of Eq. 12 (the same q for every task);
    * a :class:`~compolab.kfac.KFAC`: :math:`\sum_W \mathrm{tr}(\Delta W^\top G\,\Delta W A)`
      (the same q for every task).

    Args:
        backbone, theta0, data, head, criterion, batch_size, progress: As in
            :func:`~compolab.probes.engine.evaluate_points`.
        tau: The direction τ.
        curvature: C: ``"fisher"``, ``"hessian"``, a diagonal Fisher or a K-FAC (e.g.
            :func:`~compolab.probes.curvatures.probe_curvature` on ``data``).
        label: Name of the direction in the result.

    Returns:
        A :class:`SecondOrder` per task of ``data``.

    Raises:
        ConfigError: An unknown curvature, or τ not matching θ0 / the Fisher.
    """
    names = check_directions(theta0, [tau])
    kind = curvature_kind(curvature)
    fixed_q = None  # the same q for every task: a diagonal Fisher or a K-FAC
    if isinstance(curvature, KFAC):
        fixed_q = float(curvature.quadratic({n: tau[n] for n in names}))
    elif kind == "diagonal":
        fixed_q = float(curvature.quadratic(tau))
    like = theta0[names[0]]
    loss0, slope, quad = {}, {}, {}
    was_training = backbone.training
    backbone.eval()
    with math_attention(backbone):
        for t in tqdm(data.tasks, desc=f"second order {label}", disable=not progress, leave=False):
            sums = torch.zeros(3, dtype=torch.float64)
            for x, y in batches(data.x[t], data.y[t], batch_size):
                x, y = x.to(like.device), y.to(like.device)
                z0, v = output_jvp(backbone, head, theta0, names, tau, x)
                z0, v = z0.detach(), v.detach()
                value, first, second = scalar_derivatives(lambda s: criterion(z0 + s * v, y).sum(), like)  # noqa: B023
                if kind == "hessian":

                    def phi(s: Tensor) -> Tensor:
                        params = {n: theta0[n] + s * tau[n].to(like) for n in names}
                        return criterion(head(functional_call(backbone, params, (x,))), y).sum()  # noqa: B023

                    second = scalar_derivatives(phi, like)[2]
                sums += torch.stack([value, first, second]).double().cpu()
            n = len(data.y[t])
            loss0[t], slope[t] = float(sums[0] / n), float(sums[1] / n)
            quad[t] = fixed_q if fixed_q is not None else float(sums[2] / n)
    backbone.train(was_training)
    return SecondOrder(loss0, slope, quad, kind, label)
