r"""The curvature table: how much of the measured composition gap each curvature explains.

For pools of T modules and the first K of them composed at :math:`w_t = 1/K`
(:func:`compolab.probes.jensen_gap`), per pool (seeds averaged) and K:

* the **measured** Jensen gap :math:`\frac1K\sum_{t<K}\ell(\theta_0+\tau_t) - \ell(\theta_0+\bar\tau_K)`;
* :math:`\Omega_K = \frac{1}{2K}\sum_{t<K}(\tau_t-\bar\tau_K)^\top C(\tau_t-\bar\tau_K)` (Theorem 1)
  with C the Fisher at θ0 exact on the modules' span, its K-FAC and its diagonal, as a fraction
  of the measured gap (1 = the quadratic view explains all of it);
* the composed loss :math:`\ell(\theta_0+\bar\tau_K)` against its prediction
  :math:`\ell(\theta_0)+g^\top\bar\tau_K+\tfrac12\bar\tau_K^\top C\bar\tau_K`, as the relative error.

A pool's record is a :meth:`JensenGap.to_json <compolab.probes.JensenGap.to_json>` dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from compolab.tables.table import Stat, Table

__all__ = ["CURVATURE_NAMES", "LOSS_ERROR", "curvature_table"]

#: The curvatures of the table, in order, and how it names them.
CURVATURE_NAMES: dict[str, str] = {"fisher": "exact on the span", "kfac": "K-FAC", "diagonal": "diagonal"}
_OMEGA = {"fisher": "omega", "kfac": "omega_kfac", "diagonal": "omega_diagonal"}
#: The quantity name of the composed loss's relative prediction error.
LOSS_ERROR = "composed-loss error"


def _row(label: str, records: Sequence[Mapping], sizes: Sequence[int], quantity: str, curvature: str,
         value: Callable[[Mapping, int], float]) -> dict:  # fmt: skip
    cells = {f"K={k}": Stat.of(value(r, r["sizes"].index(k)) for r in records) for k in sizes}
    return {"pool": label, "quantity": quantity, "curvature": curvature, **cells}


def _omega(name: str) -> Callable[[Mapping, int], float]:
    return lambda r, i: r[_OMEGA[name]][i] / r["measured"][i]


def _loss_error(name: str) -> Callable[[Mapping, int], float]:
    return lambda r, i: abs(r["predicted"][name][i] - r["composed"][i]) / r["composed"][i]


def curvature_table(pools: Mapping[str, Sequence[Mapping]]) -> Table:
    """Per pool (``label -> one Jensen-gap record per seed``): the measured gap, Ω / measured and the
    composed loss's relative prediction error per curvature, for every K > 1.

    Raises:
        ValueError: Records of one pool with different K values.

    Examples:
        >>> gap = {"sizes": [1, 2], "measured": [0.0, 0.2], "omega": [0.0, 0.1], "omega_kfac": [0.0, 0.05],
        ...        "omega_diagonal": [0.0, 0.01], "composed": [2.0, 1.8],
        ...        "predicted": {"fisher": [1.9, 1.8], "kfac": [1.9, 1.62], "diagonal": [1.9, 1.71]}}
        >>> rows = curvature_table({"ITA full": [gap]}).rows
        >>> [(r["quantity"], r["curvature"]) for r in rows[:2]]
        [('measured gap', ''), ('Ω / measured', 'exact on the span')]
        >>> [round(r["K=2"].mean, 3) for r in rows[:4]]  # the gap, then Ω / gap: exact, K-FAC, diagonal
        [0.2, 0.5, 0.25, 0.05]
        >>> [round(r["K=2"].mean, 3) for r in rows[4:]]  # composed-loss error: exact, K-FAC, diagonal
        [0.0, 0.1, 0.05]
    """
    sizes: list[int] = []
    rows = []
    for label, records in pools.items():
        ks = {tuple(r["sizes"]) for r in records}
        if len(ks) != 1:
            raise ValueError(f"the records of {label} have different K values: {sorted(ks)}")
        pool_sizes = [k for k in ks.pop() if k > 1]
        sizes = sorted(set(sizes) | set(pool_sizes))
        rows.append(_row(label, records, pool_sizes, "measured gap", "", lambda r, i: r["measured"][i]))
        for name, title in CURVATURE_NAMES.items():
            if all(r.get(_OMEGA[name]) is not None for r in records):
                rows.append(_row(label, records, pool_sizes, "Ω / measured", title, _omega(name)))
        for name, title in CURVATURE_NAMES.items():
            if all(name in (r.get("predicted") or {}) for r in records):
                rows.append(_row(label, records, pool_sizes, LOSS_ERROR, title, _loss_error(name)))
    most = max((len(v) for v in pools.values()), default=0)
    return Table("Curvature: the composition gap and the composed loss predicted from θ0, per curvature",
                 ["pool", "quantity", "curvature", *(f"K={k}" for k in sizes)], rows, digits=3,
                 note="The first K modules composed at w_t = 1/K; the loss is the mean over the pool's tasks "
                      "of each task's cross-entropy on fixed training images, every head in the softmax. "
                      "Ω = (1/2K) Σ_t (τ_t − τ̄)ᵀ C (τ_t − τ̄) (Theorem 1) with C the Fisher at θ0: exact on "
                      "the modules' span (forward-mode), its K-FAC and its diagonal (Monte-Carlo estimates "
                      "on the same images, compolab.probes.probe_curvature); 1 = the quadratic view explains "
                      "the whole measured gap. Composed-loss error: |ℓ(θ0) + gᵀτ̄ + ½ τ̄ᵀCτ̄ − ℓ(θ0 + τ̄)| / "
                      f"ℓ(θ0 + τ̄). Mean ± std over seeds (up to {most}).")  # fmt: skip
