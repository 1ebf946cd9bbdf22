r"""The Jensen gap: how much the composition gains over its parts, measured and predicted.

With a convex quadratic loss the composed model is no worse than the mean of its modules (the
paper's Jensen bound, Eq. 5–6), and the gap is exactly (the paper's Theorem 1)

.. math:: \frac1K\sum_t \hat\ell(\theta_0+\tau_t) - \hat\ell(\theta_0+\bar\tau)
          = \Omega = \frac{1}{2K}\sum_t (\tau_t-\bar\tau)^\top H\,(\tau_t-\bar\tau) \;\ge 0 .

:func:`jensen_gap` measures the left side on the real loss and estimates Ω with the Fisher at θ0
(exact along the modules) and, optionally, with a K-FAC and with the paper's diagonal Fisher (Eq. 12)
(:mod:`~compolab.probes.curvatures`). It also predicts the composed loss itself,
:math:`\ell(\theta_0) + g^\top\bar\tau + \tfrac12\bar\tau^\top C\bar\tau`, with each curvature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compolab.curvature import math_attention
from compolab.errors import ConfigError
from compolab.fisher_store import DiagonalFisher
from compolab.kfac import KFAC
from compolab.probes.curvatures import curvature_gram
from compolab.probes.engine import (
    Criterion,
    ProbeData,
    batches,
    check_directions,
    cross_entropy,
    evaluate_points,
)
from compolab.probes.taylor import output_jvp, scalar_derivatives

__all__ = ["JensenGap", "jensen_gap"]


@dataclass
class JensenGap:
    r"""The composition gap as the number of composed modules K grows (Eq. 5–6, Theorem 1).

    For the first K modules with :math:`w_t = 1/K` and :math:`\bar\tau_K = \frac1K\sum_{t<K}\tau_t`:
    measured :math:`\frac1K\sum_{t<K}\ell(\theta_0+\tau_t) - \ell(\theta_0+\bar\tau_K)` against
    :math:`\Omega_K = \frac{1}{2K}\sum_{t<K}(\tau_t-\bar\tau_K)^\top C\,(\tau_t-\bar\tau_K)`.

    Attributes:
        sizes: The K values.
        modules: The module ids, in composition order.
        mean_individual: Mean loss of the K individual models.
        composed: Loss of the composed model.
        measured: ``mean_individual − composed``.
        omega: Ω with C the Fisher at θ0, exact along the modules (no diagonal).
        omega_diagonal: Ω with a diagonal Fisher, when one was given.
        omega_kfac: Ω with a K-FAC, when one was given.
        loss0: ℓ(θ0).
        predicted: The second-order prediction of ``composed``,
            :math:`\ell(\theta_0) + g^\top\bar\tau_K + \tfrac12\bar\tau_K^\top C\bar\tau_K`, per
            curvature (``"fisher"``, and ``"kfac"`` / ``"diagonal"`` when given).
    """

    sizes: list[int]
    modules: list[int]
    mean_individual: list[float]
    composed: list[float]
    measured: list[float]
    omega: list[float]
    omega_diagonal: list[float] | None = None
    omega_kfac: list[float] | None = None
    loss0: float | None = None
    predicted: dict[str, list[float]] | None = None

    def omegas(self) -> dict[str, list[float]]:
        """Ω per curvature held: ``{"fisher": ..., "kfac": ..., "diagonal": ...}``."""
        out = {"fisher": self.omega, "kfac": self.omega_kfac, "diagonal": self.omega_diagonal}
        return {k: v for k, v in out.items() if v is not None}

    def omega_error(self, curvature: str = "fisher") -> list[float]:
        """:math:`|\\Omega_K - \text{measured}_K| / |\text{measured}_K|` for every K > 1 (K = 1: gap 0).

        Raises:
            ConfigError: If this curvature's Ω was not computed.
        """
        omegas = self.omegas()
        if curvature not in omegas:
            raise ConfigError(f"no Ω with the {curvature!r} curvature here; computed: {list(omegas)}")
        pairs = zip(self.sizes, omegas[curvature], self.measured, strict=True)
        return [abs(o - m) / abs(m) for k, o, m in pairs if k > 1]

    def plot(self, ax=None):
        """Measured gap and the Ω estimates against K, on one logarithmic axis; returns ``ax``.

        One axis for every curve, so their ratio reads directly off the plot: the diagonal-Fisher
        Ω, orders of magnitude smaller, sits that far below. K = 1 (gap 0 by definition) and
        non-positive measured gaps cannot be drawn on a log axis; they are named in a note.
        """
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        series = [("measured: mean individual − composed", self.measured, "o-", "C0"),
                  ("Ω, Fisher at θ0 (along the modules)", self.omega, "s--", "C1")]  # fmt: skip
        if self.omega_kfac is not None:
            series.append(("Ω, K-FAC", self.omega_kfac, "D-.", "C4"))
        if self.omega_diagonal is not None:
            series.append(("Ω, diagonal Fisher", self.omega_diagonal, "^:", "C2"))
        skipped = []
        for label, values, style, color in series:
            pairs = list(zip(self.sizes, values, strict=True))
            keep = [(k, v) for k, v in pairs if k > 1 and v > 0]
            skipped += [f"{label.split(':')[0]} at K = {k}: {v:.3g}" for k, v in pairs if k > 1 and v <= 0]
            if keep:
                ax.plot([k for k, _ in keep], [v for _, v in keep], style, color=color, label=label)
        ax.set_yscale("log")
        ax.set(xlabel="modules composed K", ylabel="loss gap (log scale)",
               xticks=[k for k in self.sizes if k > 1])  # fmt: skip
        if skipped:
            ax.text(0.02, 0.02, "not drawn (≤ 0): " + "; ".join(skipped), transform=ax.transAxes, fontsize=7)
        ax.legend(fontsize=8)
        return ax

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {"kind": "jensen", **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping) -> JensenGap:
        """Read :meth:`to_json`'s output."""
        keys = ("sizes", "modules", "mean_individual", "composed", "measured", "omega", "omega_diagonal",
                "omega_kfac", "loss0", "predicted")
        return cls(**{k: data.get(k) for k in keys})


def jensen_gap(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    taus: Mapping[int, Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]],
    data: ProbeData,
    head: nn.Module,
    *,
    sizes: Sequence[int] | None = None,
    fisher: DiagonalFisher | None = None,
    kfac: KFAC | None = None,
    criterion: Criterion = cross_entropy,
    chunk: int | None = None,
    batch_size: int = 256,
    progress: bool | None = True,
) -> JensenGap:
    r"""Measured composition gap vs the curvature estimate Ω, composing the first K modules.

    One loss throughout: the mean over the tasks of ``data`` (the theory's single ℓ). The
    individual and composed losses come from one :func:`~compolab.probes.engine.evaluate_points`
    call; Ω from one forward-mode pass per module: :math:`J(\tau_t-\bar\tau) = J\tau_t - J\bar\tau`,
    so every K reuses the same :math:`J\tau_t`.

    Args:
        backbone, theta0, data, head, criterion, chunk, batch_size, progress: As in
            :func:`~compolab.probes.engine.evaluate_points`.
        taus: The modules (by id, in id order, or a list).
        sizes: The K values (default 1..T).
        fisher: A diagonal Fisher for the paper's proxy Ω (optional; e.g.
            :func:`~compolab.probes.curvatures.probe_curvature` on ``data``).
        kfac: A K-FAC for its Ω (optional; same).

    Raises:
        ConfigError: Fewer than one module, or sizes outside 1..T.
    """
    mods = dict(taus) if isinstance(taus, Mapping) else dict(enumerate(taus))
    ids = sorted(mods)
    names = check_directions(theta0, [mods[i] for i in ids])
    sizes = list(range(1, len(ids) + 1)) if sizes is None else [int(k) for k in sizes]
    if not sizes or any(not 1 <= k <= len(ids) for k in sizes):
        raise ConfigError(f"sizes must lie in 1..{len(ids)}, got {sizes}")
    directions = [mods[i] for i in ids]
    eye = torch.eye(len(ids)).tolist()
    composed_rows = [[1.0 / k if j < k else 0.0 for j in range(len(ids))] for k in sizes]
    loss, _ = evaluate_points(backbone, theta0, directions, eye + composed_rows, data, head,
                              criterion=criterion, chunk=chunk, batch_size=batch_size,
                              progress=progress, desc="jensen")  # fmt: skip
    task_mean = loss.mean(1)  # the multi-task loss ℓ at each point
    individual, composed = task_mean[: len(ids)], task_mean[len(ids) :]
    like = theta0[names[0]]
    # Ω_K from J τ_t on every probe batch: ½ (1/K) Σ_t (v_t − v̄)ᵀ ∇²_z ℓ (v_t − v̄), per task, then averaged.
    omega = torch.zeros(len(sizes), dtype=torch.float64)
    bar_terms = torch.zeros(len(sizes), 3, dtype=torch.float64)  # ℓ(θ0), gᵀτ̄, τ̄ᵀFτ̄ (sums per task)
    was_training = backbone.training
    backbone.eval()
    with math_attention(backbone):
        for t in tqdm(data.tasks, desc="jensen Ω", disable=not progress, leave=False):
            task_omega = torch.zeros(len(sizes), dtype=torch.float64)
            task_bar = torch.zeros(len(sizes), 3, dtype=torch.float64)
            for x, y in batches(data.x[t], data.y[t], batch_size):
                x, y = x.to(like.device), y.to(like.device)
                outs = [output_jvp(backbone, head, theta0, names, mods[i], x) for i in ids]
                z0, vs = outs[0][0].detach(), torch.stack([o[1].detach() for o in outs])
                for q, k in enumerate(sizes):
                    bar = vs[:k].mean(0)
                    terms = scalar_derivatives(lambda s: criterion(z0 + s * bar, y).sum(), like)  # noqa: B023
                    task_bar[q] += torch.stack(terms).double().cpu()
                    for j in range(k):
                        u = vs[j] - bar
                        second = scalar_derivatives(lambda s: criterion(z0 + s * u, y).sum(), like)[2]  # noqa: B023
                        task_omega[q] += float(second) / (2 * k)
            omega += task_omega / len(data.y[t])
            bar_terms += task_bar / len(data.y[t])
    backbone.train(was_training)
    omega /= len(data.tasks)
    bar_terms /= len(data.tasks)
    loss0, first = float(bar_terms[0, 0]), bar_terms[:, 1]
    predicted = {"fisher": (loss0 + first + 0.5 * bar_terms[:, 2]).tolist()}
    omegas: dict[str, list[float] | None] = {"diagonal": None, "kfac": None}
    for kind, curvature in (("diagonal", fisher), ("kfac", kfac)):
        if curvature is None:
            continue
        gram = curvature_gram(curvature, [mods[i] for i in ids])
        omegas[kind], predicted[kind] = [], []
        for q, k in enumerate(sizes):
            w = torch.zeros(len(ids), dtype=torch.float64)
            w[:k] = 1.0 / k
            spread = torch.eye(len(ids), dtype=torch.float64)[:k] - w  # rows e_t − w, t < K
            omegas[kind].append(float(torch.einsum("ts,su,tu->", spread, gram, spread)) / (2 * k))
            predicted[kind].append(loss0 + float(first[q]) + 0.5 * float(w @ gram @ w))
    mean_ind = [float(individual[:k].mean()) for k in sizes]
    comp = composed.tolist()
    return JensenGap(sizes, ids, mean_ind, comp, [m - c for m, c in zip(mean_ind, comp, strict=True)],
                     omega.tolist(), omegas["diagonal"], omegas["kfac"], loss0, predicted)  # fmt: skip
