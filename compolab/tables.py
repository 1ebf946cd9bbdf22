r"""The editing tables of a set of runs: composition, unlearning, specialization (mean ± std over seeds).

Three tables, built from run folders (``compolab train --out``) and their pools:

* **composition** (:func:`composition_table`) — the final average accuracy (FA, %) of the composed
  model θ0 + Σ_t w_t τ_t, per method (rows, with the ablations "without Eq. 12 / 19" and "only on
  CLS") and tuning style (columns): the shape of the paper's Tables 1, 2 and 6;
* **unlearning** (:func:`unlearning_table`) — per forgotten task k, the *target* accuracy (on task
  k) and the *control* accuracy (mean over the other tasks) after **dropping** τ_k,
  θ0 + Σ_{t≠k} τ_t / (T−1), or **negating** it, θ0 + (Σ_{t≠k} τ_t − γ τ_k) / (T−1) (γ = 1 by
  default: τ_k enters with the weight of the others, sign flipped); raw, and normalised by the
  accuracy of the same task before editing. Every task's head stays in the output (argmax over all
  classes): dropping a head as well would zero the target by construction and say nothing about
  what the backbone still knows;
* **specialization** (:func:`specialization_table`) — for each subset S (every single task and
  every "all but one"), the accuracy on S's tasks of the subset composition
  θ0 + Σ_{t∈S} τ_t / |S| against the full composition, both with the heads of S only (class-IL
  over S's classes), and their difference.

Each cell is a :class:`Stat`: mean ± sample standard deviation over the seeds present. A run is a
:class:`RunRecord`; the numbers of its pool come from :func:`compolab.measure.measure_edits`
(JSON-ready, so ``compolab reproduce`` caches them). Tables are written as markdown and CSV by
:func:`write_table`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from compolab.io import atomic_write
from compolab.methods import TABLE_METHODS, get_method
from compolab.tuning import STYLES

__all__ = [
    "Stat",
    "Table",
    "RunRecord",
    "composition_table",
    "unlearning_table",
    "specialization_table",
    "write_table",
]


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation and number of values of one cell."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        """The statistics of ``values`` (std 0 for a single value).

        Examples:
            >>> Stat.of([1.0, 2.0, 3.0])
            Stat(mean=2.0, std=1.0, n=3)
        """
        v = [float(x) for x in values]
        if not v:
            raise ValueError("no value to summarise")
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        return cls(mean, std, len(v))

    def format(self, digits: int = 1) -> str:
        """``mean ± std`` (``mean`` alone for one value)."""
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if self.n > 1 else f"{self.mean:.{digits}f}"


@dataclass
class Table:
    """A table of labels and :class:`Stat` cells.

    Attributes:
        title: One line.
        columns: Column names; the leading columns hold labels, the others :class:`Stat` s (or None).
        rows: One dict per row, ``column -> str | Stat | None``.
        digits: Decimals in the markdown rendering.
        note: What the numbers are (printed under the markdown table).
    """

    title: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    digits: int = 1
    note: str = ""

    def select(self, **labels: str) -> dict:
        """The one row whose label columns match ``labels`` (``column=value``, spaces as ``_``)."""
        want = {k.replace("_", " "): str(v) for k, v in labels.items()}
        found = [r for r in self.rows if all(str(r.get(k)) == v for k, v in want.items())]
        if len(found) != 1:
            raise KeyError(f"{len(found)} rows of {self.title!r} match {want}")
        return found[0]

    def to_markdown(self) -> str:
        """A GitHub markdown table, its title in bold and its note below."""

        def cell(v) -> str:
            return "–" if v is None else v.format(self.digits) if isinstance(v, Stat) else str(v)

        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]  # fmt: skip
        lines += ["| " + " | ".join(cell(r.get(c)) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines + ([f"\n{self.note}"] if self.note else [])) + "\n"

    def to_csv(self) -> str:
        """CSV: label columns as they are; each statistic column as ``<c>``, ``<c> std``, ``<c> n``."""
        stats = [c for c in self.columns if any(isinstance(r.get(c), Stat) for r in self.rows)]
        header = [h for c in self.columns for h in ([c, f"{c} std", f"{c} n"] if c in stats else [c])]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for r in self.rows:
            out = []
            for c in self.columns:
                v = r.get(c)
                if c in stats:
                    out += [f"{v.mean:.4f}", f"{v.std:.4f}", v.n] if isinstance(v, Stat) else ["", "", 0]
                else:
                    out.append("" if v is None else v)
            writer.writerow(out)
        return buf.getvalue()


def write_table(table: Table, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.md`` and ``<stem>.csv`` (atomically); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, cs = out / f"{stem}.md", out / f"{stem}.csv"
    for path, text in ((md, table.to_markdown()), (cs, table.to_csv())):
        atomic_write(path, lambda p, text=text: p.write_text(text, encoding="utf-8"))
    return md, cs


@dataclass(frozen=True)
class RunRecord:
    """What the tables need of one finished run (:func:`compolab.measure.read_run`).

    Attributes:
        method, style, ablation, seed: From its config.
        final_accuracy: FA (%) of its composition.
        edits: :func:`~compolab.measure.measure_edits` of its pool (None when not measured).
        path: The run folder.
    """

    method: str
    style: str
    ablation: str
    seed: int
    final_accuracy: float
    edits: dict | None = None
    path: str = ""


# --------------------------------------------------------------------------- the three tables


def _groups(runs: Iterable[RunRecord]) -> dict[tuple[str, str, str], list[RunRecord]]:
    """``(method, style, ablation) -> runs`` (one per seed, in seed order)."""
    out: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: r.seed):
        out.setdefault((r.method, r.style, r.ablation), []).append(r)
    return out


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
            if not any(k[0] == name and k[2] == ablation for k in groups):
                continue
            label = (method.label or name) if ablation == "none" else method.ablation_labels[ablation]
            row: dict = {"method": label}
            for style in styles:
                rs = groups.get((name, style, ablation))
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
              if k[1] == style and k[2] == "none" and get_method(k[0]).editable}  # fmt: skip
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
