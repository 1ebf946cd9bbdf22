"""A table of labelled :class:`Stat` cells (mean ± std over seeds), as markdown and CSV.

:class:`Stat` summarises the values of one cell, :class:`Table` holds the rows and renders them,
:func:`write_table` writes both renderings next to each other.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from compolab.io import atomic_write

__all__ = ["Stat", "Table", "write_table"]


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
