"""A table of labelled :class:`Stat` cells (mean ± std over seeds), as markdown and CSV.

:class:`Stat` summarises the values of one cell, :class:`Table` holds the rows and renders them,
:func:`write_table` writes both renderings next to each other and :func:`read_table` reads the CSV
back (a notebook reads the tables ``compolab reproduce`` wrote without retraining them).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from compolab.io import atomic_write

__all__ = ["Stat", "Table", "read_table", "write_table", "side_by_side"]


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


def read_table(path: str | Path, title: str = "") -> Table:
    """The :class:`Table` of a CSV written by :meth:`Table.to_csv` (``title`` defaults to the file's stem).

    A column ``c`` followed by ``c std`` and ``c n`` is a statistic (an empty cell, ``n = 0``, is None);
    every other column is a label.

    Examples:
        >>> t = Table("t", ["method", "lora"], [{"method": "ITA", "lora": Stat(72.0, 2.0, 3)}])
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> read_table(write_table(t, d, "t")[1]).select(method="ITA")["lora"]
        Stat(mean=72.0, std=2.0, n=3)
    """
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        header, *body = list(csv.reader(f))
    columns, stats, i = [], set(), 0
    while i < len(header):
        c = header[i]
        columns.append(c)
        if header[i + 1 : i + 3] == [f"{c} std", f"{c} n"]:
            stats.add(c)
            i += 3
        else:
            i += 1
    rows = []
    for line in body:
        if len(line) != len(header):
            raise ValueError(f"{path}: a row has {len(line)} cells, the header {len(header)}")
        cells, row = iter(line), {}
        for c in columns:
            if c in stats:
                mean, std, n = next(cells), next(cells), int(next(cells))
                row[c] = Stat(float(mean), float(std), n) if n > 0 else None
            else:
                row[c] = next(cells)
        rows.append(row)
    return Table(title or path.stem, columns, rows)


def side_by_side(tables: dict[str, Table], title: str, columns: Iterable[str] | None = None) -> Table:
    """One table of several worlds' tables of the same shape: ``"<world> <column>"`` statistic columns.

    Rows are matched on the label columns of the first table (its columns that hold no
    :class:`Stat`), in the order of first appearance; a row or column one world lacks is ``None``
    there.

    Args:
        tables: ``world -> table``, e.g. ``{"tiny10": …, "real-small": …}``.
        title: The new table's title.
        columns: The statistic columns to keep (default: every one of the first table).

    Examples:
        >>> a = Table("a", ["method", "lora"], [{"method": "ITA", "lora": Stat(56.5, 0.7, 3)}])
        >>> b = Table("b", ["method", "lora"], [{"method": "ITA", "lora": Stat(35.6, 0.0, 1)}])
        >>> t = side_by_side({"tiny10": a, "real-small": b}, "both")
        >>> t.columns, t.select(method="ITA")["real-small lora"].mean
        (['method', 'tiny10 lora', 'real-small lora'], 35.6)
    """
    first = next(iter(tables.values()))
    labels = [c for c in first.columns if not any(isinstance(r.get(c), Stat) for r in first.rows)]
    stats = list(columns) if columns is not None else [c for c in first.columns if c not in labels]
    keys: list[tuple] = []
    for table in tables.values():
        keys += [k for k in (tuple(r.get(c) for c in labels) for r in table.rows) if k not in keys]
    rows = []
    for key in keys:
        row: dict = dict(zip(labels, key, strict=True))
        for world, table in tables.items():
            found = [r for r in table.rows if tuple(r.get(c) for c in labels) == key]
            for c in stats:
                row[f"{world} {c}"] = found[0].get(c) if found else None
        rows.append(row)
    names = [f"{w} {c}" for c in stats for w in tables]  # each column, every world beside each other
    return Table(title, labels + names, rows, first.digits)
