r"""The merging tables: every merge of the same pools on the same test sets, and the second-order view.

* :func:`merging_table` — FA (%, class-incremental) of each merge (rows) of each pool (columns),
  with the pool's own composition :math:`\theta_0 + \sum_t \tau_t / T` as the first row;
* :func:`merging_lens_table` — per pool and merge: FA, the accuracy normalised by each task's
  fine-tuned model :math:`\theta_0 + \tau_t` (task identity given), the measured composed loss, its
  second-order prediction from θ0 (Eq. 2), and the weight disentanglement error ξ; the note gives,
  per pool, the Spearman rank correlation between predicted and measured loss across merges.

A merge's result is the summary of :func:`compolab.merge_pool.merge_pool` (``{"merge", "chosen",
"test_accuracy", "lens": {...}}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from compolab.tables.table import Stat, Table

__all__ = ["COMPOSITION_ROW", "merging_lens_table", "merging_table", "spearman"]

#: The row name of a pool's own composition (task arithmetic at w_t = 1/T).
COMPOSITION_ROW = "composition (w_t = 1/T)"


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 2 points or no spread.

    Examples:
        >>> spearman([1, 2, 3, 4], [10, 20, 40, 30])
        0.8
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def _name(summary: Mapping) -> str:
    return COMPOSITION_ROW if summary.get("reference") else summary["merge"]


def merging_table(pools: Mapping[str, Sequence[Mapping]]) -> Table:
    """FA (%) of each merge (rows) of each pool (columns, e.g. ``"ITA lora"``)."""
    names: list[str] = []
    for results in pools.values():
        names += [n for n in map(_name, results) if n not in names]
    names.sort(key=lambda n: n != COMPOSITION_ROW)  # the pool's own composition first
    rows = []
    for name in names:
        row: dict = {"merge": name}
        for pool, results in pools.items():
            found = [r["test_accuracy"] for r in results if _name(r) == name]
            row[pool] = Stat.of(found) if found else None
        rows.append(row)
    return Table("Merging: FA (%) of θ0 + τ_merged, every merge of the same pools", ["merge", *pools], rows,
                 note="Class-incremental, argmax over every class seen, test split; each merge's "
                      "hyper-parameters chosen on the validation split (`compolab merge`).")  # fmt: skip


_LENS = ("FA", "normalized acc.", "measured loss", "predicted loss", "ξ")


def merging_lens_table(pools: Mapping[str, Sequence[Mapping]]) -> Table:
    """Per pool and merge: FA, normalised accuracy, measured and predicted loss, disentanglement error."""
    rows, rhos = [], []
    for pool, results in pools.items():
        for r in sorted(results, key=lambda r: _name(r) != COMPOSITION_ROW):
            lens = r["lens"]
            values = (r["test_accuracy"], lens["normalized_accuracy"], lens["measured_loss"],
                      lens["predicted_loss"], lens["disentanglement_error"])  # fmt: skip
            cells = {c: Stat.of([v]) for c, v in zip(_LENS, values, strict=True)}
            rows.append({"pool": pool, "merge": _name(r), **cells})
        lenses = [r["lens"] for r in results]
        rho = spearman([x["predicted_loss"] for x in lenses], [x["measured_loss"] for x in lenses])
        rhos.append(f"{pool} {rho:+.2f}")
    return Table("Merging through the second-order lens", ["pool", "merge", *_LENS], rows, digits=3,
                 note="normalized acc.: mean over tasks of the merge's accuracy on task t over θ0 + τ_t's "
                      "(own head, task identity given); measured loss: class-incremental cross-entropy of "
                      "θ0 + τ_merged; predicted: ℓ(θ0) + gᵀτ + ½ τᵀFτ (Eq. 2, Fisher exact along τ); ξ: "
                      "weight disentanglement error (Ortiz-Jiménez et al.). Spearman ρ(predicted, measured) "
                      f"across merges: {', '.join(rhos)}.")  # fmt: skip
