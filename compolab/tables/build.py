"""The three editing tables of a set of runs: composition, unlearning, specialization.

Each builder takes :class:`RunRecord` s (one per finished run, its measured edits attached) and
returns a :class:`~compolab.tables.table.Table`; rows follow :data:`~compolab.tables.policy.TABLE_METHODS`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from compolab.methods import get_method
from compolab.tables.policy import CURVATURE_LABELS, TABLE_METHODS
from compolab.tables.table import Stat, Table
from compolab.tuning import STYLES

__all__ = ["RunRecord", "row_label", "composition_table", "fa_by_tasks_table", "unlearning_table",
           "specialization_table"]


@dataclass(frozen=True)
class RunRecord:
    """What the tables need of one finished run (:func:`compolab.measure.read_run`).

    Attributes:
        method, style, ablation, seed: From its config.
        final_accuracy: FA (%) of its composition.
        edits: :func:`~compolab.measure.measure_edits` of its pool (None when not measured).
        path: The run folder.
        fa_by_tasks: FA (%) after each task: the mean of each row of its accuracy matrix (the FA
            of a run of the first T tasks, since no task's training depends on the later ones).
        curvature: The curvature of ITA's / IEL's penalty (``diag``, the paper's, or ``kfac``).
    """

    method: str
    style: str
    ablation: str
    seed: int
    final_accuracy: float
    edits: dict | None = None
    path: str = ""
    fa_by_tasks: tuple[float, ...] = ()
    curvature: str = "diag"


def _groups(runs: Iterable[RunRecord]) -> dict[tuple[str, str, str, str], list[RunRecord]]:
    """``(method, style, ablation, curvature) -> runs`` (one per seed, in seed order)."""
    out: dict[tuple[str, str, str, str], list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: r.seed):
        out.setdefault((r.method, r.style, r.ablation, r.curvature), []).append(r)
    return out


def row_label(name: str, ablation: str = "none", curvature: str = "diag") -> str:
    """The row label: the method's, its ablation's, with a non-diagonal curvature named."""
    method = get_method(name)
    label = (method.label or name) if ablation == "none" else method.ablation_labels[ablation]
    return label if curvature == "diag" else f"{label}, {CURVATURE_LABELS.get(curvature, curvature)}"


def _method_order(names: Iterable[str]) -> list[str]:
    """The table's methods first (``TABLE_METHODS``), then any other, by name."""
    names = set(names)
    return [m for m in TABLE_METHODS if m in names] + sorted(names - set(TABLE_METHODS))


def composition_table(runs: Iterable[RunRecord]) -> Table:
    """FA (%) per method (and ablation) × tuning style: the paper's Table 1 / 2 / 6 shape."""
    groups = _groups(runs)
    styles = [s for s in STYLES if any(k[1] == s for k in groups)]
    rows = []
    for name in _method_order(k[0] for k in groups):
        method = get_method(name)
        for ablation in ("none", *method.ablation_labels):
            for curvature in sorted({k[3] for k in groups if k[0] == name and k[2] == ablation},
                                    key=lambda c: (c != "diag", c)):  # fmt: skip
                row: dict = {"method": row_label(name, ablation, curvature)}
                for style in styles:
                    rs = groups.get((name, style, ablation, curvature))
                    row[style] = Stat.of(r.final_accuracy for r in rs) if rs else None
                rows.append(row)
    most = max((len(v) for v in groups.values()), default=0)
    return Table("Composition: final average accuracy (%) of θ0 + Σ_t τ_t / T", ["method", *styles], rows,
                 note="Class-incremental, argmax over every class seen. mean ± std over seeds where a "
                      f"cell shows ± (up to {most}); a single number is one seed.")  # fmt: skip


def _ratio(x: float, before: float) -> float:
    return x / before if before > 0 else float("nan")


def _editable(runs: Iterable[RunRecord], style: str) -> dict[str, list[RunRecord]]:
    """``method -> runs`` with measured edits, of ``style``, without ablation, in table order."""
    groups = {k[0]: v for k, v in _groups(r for r in runs if r.edits is not None).items()
              if k[1:] == (style, "none", "diag") and get_method(k[0]).editable}  # fmt: skip
    return {m: groups[m] for m in _method_order(groups)}


def unlearning_table(runs: Iterable[RunRecord], style: str = "lora") -> Table:
    """Per forgotten task k: target (task k) and control (the others) accuracy after dropping or
    negating τ_k, raw and normalised by the accuracy before editing (every head kept)."""
    rows = []
    for name, rs in _editable(runs, style).items():
        for edit in ("drop", "negate"):
            per_k: dict[str, list[list[float]]] = {}  # k -> per seed [target, control, target n., control n.]
            for r in rs:
                before, e = r.edits["before"], r.edits[edit]
                for k, acc in e.items():
                    others = [t for t in acc if t != k]
                    per_k.setdefault(k, []).append([
                        acc[k], sum(acc[t] for t in others) / len(others), _ratio(acc[k], before[k]),
                        sum(_ratio(acc[t], before[t]) for t in others) / len(others)])  # fmt: skip
            ks = sorted(per_k, key=int)
            mean_k = [[sum(per_k[k][i][j] for k in ks) / len(ks) for j in range(4)] for i in range(len(rs))]
            for k, values in [*((k, per_k[k]) for k in ks), ("mean", mean_k)]:
                cols = [Stat.of(v[j] for v in values) for j in range(4)]
                rows.append({"method": get_method(name).label, "edit": f"{edit} τ_k", "k": k,
                             **dict(zip(_UNLEARNING, cols, strict=True))})  # fmt: skip
    coef = {r.edits["negate_coef"] for rs in _editable(runs, style).values() for r in rs}
    return Table(f"Unlearning ({style}): accuracy (%) on the forgotten task k (target) and the others "
                 "(control)", ["method", "edit", "k", *_UNLEARNING], rows, digits=2,
                 note="drop: θ0 + Σ_{t≠k} τ_t/(T−1); negate: θ0 + (Σ_{t≠k} τ_t − γ τ_k)/(T−1), γ = "
                      f"{', '.join(map(str, sorted(coef)))}. Every task's head stays in the argmax. "
                      "'/ before': accuracy over the accuracy of the same task in the unedited "
                      "composition (control: mean of the ratios). Mean ± std over seeds.")  # fmt: skip


_UNLEARNING = ("target", "control", "target / before", "control / before")


def specialization_table(runs: Iterable[RunRecord], style: str = "lora") -> Table:
    """Per subset S: accuracy on S of the subset composition vs the full composition (heads of S)."""
    rows = []
    for name, rs in _editable(runs, style).items():
        per_s: dict[str, list[list[float]]] = {}  # subset -> per seed [subset, full, subset - full]
        for r in rs:
            for key, acc in r.edits["subsets"].items():
                sub, full = (sum(acc[w].values()) / len(acc[w]) for w in ("subset", "full"))
                per_s.setdefault(key, []).append([sub, full, sub - full])
        keys = sorted(per_s, key=lambda s: (len(s), s))
        mean_s = [[sum(per_s[s][i][j] for s in keys) / len(keys) for j in range(3)] for i in range(len(rs))]
        for key, values in [*((s, per_s[s]) for s in keys), ("mean", mean_s)]:
            cols = [Stat.of(v[j] for v in values) for j in range(3)]
            subset = "mean" if key == "mean" else "{" + key.replace(",", ", ") + "}"
            rows.append({"method": get_method(name).label, "S": subset,
                         **dict(zip(_SPECIALIZATION, cols, strict=True))})  # fmt: skip
    return Table(f"Specialization ({style}): accuracy (%) on the tasks of S",
                 ["method", "S", *_SPECIALIZATION], rows, digits=2,
                 note="subset: θ0 + Σ_{t∈S} τ_t/|S|; full: θ0 + Σ_t τ_t/T; both predict over the classes "
                      "of S only (the heads of S). Mean ± std over seeds.")  # fmt: skip


_SPECIALIZATION = ("subset", "full", "subset − full")


def fa_by_tasks_table(runs: Iterable[RunRecord]) -> Table:
    """FA (%) after T = 1 … N tasks per method and tuning style (no ablation): how composition degrades
    as modules are added (the regularisation gap against naive task arithmetic opening with T)."""
    groups = {k: v for k, v in _groups(runs).items() if k[2] == "none"}
    n = max((len(r.fa_by_tasks) for rs in groups.values() for r in rs), default=0)
    columns = [f"T={t}" for t in range(1, n + 1)]
    rows = []
    for style in (s for s in STYLES if any(k[1] == s for k in groups)):
        for name in _method_order(k[0] for k in groups if k[1] == style):
            for curvature in sorted({k[3] for k in groups if k[:2] == (name, style)},
                                    key=lambda c: (c != "diag", c)):  # fmt: skip
                rs = [r for r in groups[(name, style, "none", curvature)] if len(r.fa_by_tasks) == n]
                if n > 1 and rs:  # runs of all N tasks only (joint training has one row)
                    rows.append({"method": row_label(name, "none", curvature), "style": style,
                                 **{c: Stat.of(r.fa_by_tasks[t] for r in rs) for t, c in enumerate(columns)}})
    return Table("FA (%) after T tasks", ["method", "style", *columns], rows,
                 note="Row T of each run's accuracy matrix (the composition of its first T modules); "
                      "mean ± std over seeds.")  # fmt: skip
