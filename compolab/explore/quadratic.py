r"""The second-order model of the composed loss (the paper's expansion around θ0, Eq. 2).

For the composition :math:`\theta_0 + \Delta`, :math:`\Delta = \sum_t w_t \tau_t`, the expansion

.. math:: \ell(\theta_0 + \Delta) \approx \ell(\theta_0) + g^\top \Delta + \tfrac12\, \Delta^\top F \Delta

is a quadratic form in the weights :math:`w` once three things are known per task k:
:math:`\ell_k(\theta_0)`, the slopes :math:`g_k^\top \tau_t` and the Gram matrix
:math:`G^{(k)}_{st} = \tau_s^\top F_k \tau_t`. :class:`Quadratic` computes them once
(:meth:`Quadratic.from_model`: one forward-mode pass per module over the evaluation images), after
which every prediction costs :math:`O(T^2)`.

F is the Fisher of the kit's probes: either exact on the span of the modules (``"fisher"``, the
generalised Gauss–Newton matrix :math:`\frac1N\sum_n J_n^\top(\mathrm{diag}\,p_n - p_n p_n^\top)J_n`,
which for cross-entropy *is* the true Fisher), a :class:`~compolab.kfac.KFAC`, or a
:class:`~compolab.fisher_store.DiagonalFisher` (the paper's proxy of Eq. 12); the last two are the
same for every task (:mod:`compolab.probes.curvatures`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compolab.errors import ConfigError
from compolab.probes import ProbeData, SecondOrder
from compolab.probes.curvatures import Curvature, curvature_gram, curvature_kind
from compolab.probes.engine import batches, check_directions
from compolab.probes.taylor import output_jvp

__all__ = ["Quadratic"]


@dataclass(frozen=True)
class Quadratic:
    r"""Per-task quadratic model
    :math:`\hat\ell_k(w) = \ell_k(\theta_0) + w^\top s_k + \tfrac12 w^\top G^{(k)} w`.

    Attributes:
        tasks: The evaluated tasks (rows).
        modules: The module ids (the order of ``w``).
        loss0: ``(K,)`` :math:`\ell_k(\theta_0)`, float64.
        slope: ``(K, T)`` :math:`g_k^\top \tau_t`.
        gram: ``(K, T, T)`` :math:`\tau_s^\top F_k \tau_t`.
        kind: ``"fisher"`` (exact on the modules' span), ``"kfac"`` or ``"diagonal"``.
    """

    tasks: tuple[int, ...]
    modules: tuple[int, ...]
    loss0: Tensor
    slope: Tensor
    gram: Tensor
    kind: str = "fisher"

    def __post_init__(self) -> None:
        K, T = len(self.tasks), len(self.modules)
        for name, shape in (("loss0", (K,)), ("slope", (K, T)), ("gram", (K, T, T))):
            value = torch.as_tensor(getattr(self, name), dtype=torch.float64)
            if tuple(value.shape) != shape:
                raise ConfigError(f"Quadratic.{name} must have shape {shape}, got {tuple(value.shape)}")
            object.__setattr__(self, name, value)

    def predict_tasks(self, coefs: Tensor | Sequence[float]) -> Tensor:
        """``(K,)`` predicted loss of each task at weights ``coefs`` (or ``(P, K)`` for ``(P, T)``).

        Examples:
            >>> q = Quadratic((0,), (0, 1), torch.tensor([1.0]), torch.tensor([[0.0, 1.0]]),
            ...               torch.tensor([[[2.0, 0.0], [0.0, 4.0]]]))
            >>> q.predict_tasks([1.0, 0.5]).tolist()  # 1 + 0.5 + ½ (2·1 + 4·0.25)
            [3.0]
        """
        w = torch.as_tensor(coefs, dtype=torch.float64)
        if w.shape[-1] != len(self.modules):
            raise ConfigError(f"expected {len(self.modules)} weights, got shape {tuple(w.shape)}")
        single = w.ndim == 1
        w = w.reshape(-1, len(self.modules))  # (P, T)
        quad = torch.einsum("ps,kst,pt->pk", w, self.gram, w)
        out = self.loss0 + w @ self.slope.T + 0.5 * quad
        return out[0] if single else out

    def predict(self, coefs: Tensor | Sequence[float]) -> float:
        """The predicted multi-task loss (mean over tasks) at weights ``coefs``: :math:`O(KT^2)`."""
        return float(self.predict_tasks(coefs).mean())

    def along(self, module: int, label: str | None = None) -> SecondOrder:
        r"""The parabola along :math:`\theta_0 + \lambda\tau_t` (notebook 02's Taylor parabola) as a
        :class:`~compolab.probes.SecondOrder`, ready for ``.predict`` and ``.plot``."""
        if module not in self.modules:
            raise ConfigError(f"unknown module {module}; the modules are {list(self.modules)}")
        j = self.modules.index(module)
        rows = range(len(self.tasks))
        return SecondOrder(
            {t: float(self.loss0[k]) for k, t in zip(rows, self.tasks, strict=True)},
            {t: float(self.slope[k, j]) for k, t in zip(rows, self.tasks, strict=True)},
            {t: float(self.gram[k, j, j]) for k, t in zip(rows, self.tasks, strict=True)},
            self.kind,
            label or f"τ{module}",
        )

    @classmethod
    @torch.no_grad()
    def from_model(
        cls,
        backbone: nn.Module,
        theta0: Mapping[str, Tensor],
        taus: Mapping[int, Mapping[str, Tensor]],
        data: ProbeData,
        head: nn.Module,
        *,
        curvature: str | Curvature = "fisher",
        batch_size: int = 256,
    ) -> Quadratic:
        r"""Measure :math:`\ell_k(\theta_0)`, :math:`g_k^\top\tau_t` and :math:`G^{(k)}` on ``data``.

        With logits :math:`z_n`, :math:`p_n = \mathrm{softmax}(z_n)` and :math:`v_{nt} = J_n\tau_t`
        (one jvp per module), for the images n of task k (cross-entropy):
        :math:`g_k^\top\tau_t = \frac1{N_k}\sum_n (p_n - e_{y_n})^\top v_{nt}` and
        :math:`G^{(k)}_{st} = \frac1{N_k}\sum_n v_{ns}^\top(\mathrm{diag}\,p_n - p_n p_n^\top)v_{nt}`
        (``"fisher"``), or :math:`\tau_s^\top C\tau_t` of a diagonal Fisher or a K-FAC
        (:func:`~compolab.probes.curvatures.curvature_gram`).

        Args:
            backbone: Inputs → features, at θ0 (eval mode).
            theta0: θ0, at least the modules' names.
            taus: ``{module: τ_t}``.
            data: The evaluation images; targets are columns of ``head``'s outputs.
            head: Features → logits (fixed).
            curvature: ``"fisher"``, a :class:`~compolab.fisher_store.DiagonalFisher` or a
                :class:`~compolab.kfac.KFAC`.
            batch_size: Images per jvp.

        Raises:
            ConfigError: No module, modules not matching θ0, or an unknown curvature.
        """
        if not taus:
            raise ConfigError("a quadratic model needs at least one module")
        kind = curvature_kind(curvature)
        if kind == "hessian":
            raise ConfigError("the explorer's quadratic takes 'fisher', a DiagonalFisher or a KFAC, "
                              "not 'hessian'")
        modules = tuple(sorted(taus))
        names = check_directions(theta0, [taus[t] for t in modules])
        was_training = backbone.training
        backbone.eval()
        K, T = len(data.tasks), len(modules)
        loss0 = torch.zeros(K, dtype=torch.float64)
        slope = torch.zeros(K, T, dtype=torch.float64)
        gram = torch.zeros(K, T, T, dtype=torch.float64)
        like = theta0[names[0]]
        for k, task in enumerate(data.tasks):
            for x, y in batches(data.x[task], data.y[task], batch_size):
                x, y = x.to(like.device), y.to(like.device)
                vs = []
                for t in modules:
                    z0, v = output_jvp(backbone, head, theta0, names, taus[t], x)
                    vs.append(v.double())
                z, v = z0.double(), torch.stack(vs)  # (B, C), (T, B, C)
                p = z.softmax(-1)
                loss0[k] += F.cross_entropy(z, y, reduction="sum").cpu()
                residual = p - F.one_hot(y, z.shape[-1]).double()
                slope[k] += torch.einsum("bc,tbc->t", residual, v).cpu()
                pv = torch.einsum("bc,tbc->tb", p, v)
                gram[k] += (torch.einsum("bc,sbc,tbc->st", p, v, v) - pv @ pv.T).cpu()
            n = len(data.y[task])
            loss0[k], slope[k], gram[k] = loss0[k] / n, slope[k] / n, gram[k] / n
        backbone.train(was_training)
        if kind != "fisher":
            gram = curvature_gram(curvature, [{n: taus[t][n] for n in names} for t in modules])
            gram = gram.expand(K, T, T).clone()
        return cls(tuple(data.tasks), modules, loss0, slope, gram, kind)
