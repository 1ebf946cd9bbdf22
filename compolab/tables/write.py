"""The editing tables of a set of run folders, and the merging tables of their pools, as markdown + CSV.

Not re-exported by :mod:`compolab.tables`: it reads run folders through
:func:`compolab.measure.read_run`, and :mod:`compolab.measure` imports :mod:`compolab.tables`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from compolab.io import read_json
from compolab.measure import read_run
from compolab.methods import get_method
from compolab.tables.build import (
    RunRecord,
    composition_table,
    fa_by_tasks_table,
    row_label,
    specialization_table,
    unlearning_table,
)
from compolab.tables.curvature import curvature_table
from compolab.tables.merging import merging_lens_table, merging_table
from compolab.tables.policy import SAME_RUN
from compolab.tables.table import write_table

__all__ = ["read_records", "write_curvature_tables", "write_merge_tables", "write_run_tables"]


def read_records(
    runs: Sequence[tuple[str, str | None]], methods: Sequence[str]
) -> tuple[list[RunRecord], list[str]]:
    """The records of the finished runs among ``runs`` and the notes on the rows they share.

    Args:
        runs: ``(run folder, its cached edits JSON or None)``, in table order; unfinished ones are skipped.
        methods: The methods of the grid: a run stands for a :data:`~compolab.tables.policy.SAME_RUN`
            row (and is shown there too) only when that row's method is one of them.

    Returns:
        ``(records, notes)``: one note per shared pair of rows, for the composition table.
    """
    stands_for = {same: row for row, same in SAME_RUN.items() if row[0] in methods}
    records, shared = [], []
    for out, edits in runs:
        if not (Path(out) / "results.json").exists():
            continue
        try:
            record = read_run(out, read_json(edits) if edits is not None else None)
        except ValueError:  # not finished
            continue
        records.append(record)
        row = stands_for.get((record.method, record.ablation))
        if row is not None:  # the same run, shown in the row it stands for too
            records.append(replace(record, method=row[0], ablation=row[1], edits=None))
            pair = f"{get_method(row[0]).ablation_labels[row[1]]} and {get_method(record.method).label}"
            note = f"{pair} are one computation (`tests/test_run.py`): trained once, shown in both rows."
            shared += [note] if note not in shared else []
    return records, shared


def write_run_tables(
    runs: Sequence[tuple[str, str | None]],
    out_dir: str | Path,
    *,
    methods: Sequence[str],
    style: str,
    made: str = "",
) -> list[Path]:
    """Composition, unlearning, specialization, FA after T tasks of ``runs`` in ``out_dir`` (md + CSV).

    Args:
        runs, methods: As :func:`read_records`.
        out_dir: The tables' folder (created).
        style: The tuning style of the two editing tables.
        made: A last line of every note (how the tables were made).

    Returns:
        The paths written: ``.md`` then ``.csv`` of each table.
    """
    records, shared = read_records(runs, methods)
    paths: list[Path] = []
    for stem, table, extra in (("composition", composition_table(records), shared),
                               ("unlearning", unlearning_table(records, style), []),
                               ("specialization", specialization_table(records, style), []),
                               ("fa_by_tasks", fa_by_tasks_table(records), [])):  # fmt: skip
        table.note = "\n\n".join([table.note, *extra, made]).strip()
        paths += write_table(table, out_dir, stem)
    return paths


def write_merge_tables(
    merges: Sequence[tuple[str, str]], out_dir: str | Path, *, made: str = ""
) -> list[Path]:
    """The merging tables (:mod:`compolab.tables.merging`) of cached merge results, in ``out_dir``.

    Args:
        merges: ``(run folder, merges JSON)`` pairs (``compolab reproduce``'s merges jobs); the
            column of a pool is its run's method label and tuning style, e.g. ``ITA lora``.
        out_dir: The tables' folder (created).
        made: A last line of every note.

    Returns:
        The paths written (none when no merge result exists).
    """
    pools: dict[str, list] = {}
    for run_dir, path in merges:
        if not Path(path).exists():
            continue
        cfg = read_json(Path(run_dir) / "results.json", what="run results")["config"]
        label = f"{get_method(cfg['method']).label or cfg['method']} {cfg['finetune']['style']}"
        pools[label] = read_json(path, what="merge results")["merges"]
    if not pools:
        return []
    paths: list[Path] = []
    for stem, table in (("merging", merging_table(pools)), ("merging_lens", merging_lens_table(pools))):
        table.note = "\n\n".join([table.note, made]).strip()
        paths += write_table(table, out_dir, stem)
    return paths


def write_curvature_tables(
    probes: Sequence[tuple[str, str]], out_dir: str | Path, *, made: str = ""
) -> list[Path]:
    """The curvature table (:mod:`compolab.tables.curvature`) of cached curvature probes, in ``out_dir``.

    Args:
        probes: ``(run folder, curvature JSON)`` pairs (``compolab reproduce``'s curvature jobs); a
            pool's label is its run's row label and tuning style, e.g. ``ITA, K-FAC curvature full``,
            and the seeds of one label are averaged.
        out_dir: The tables' folder (created).
        made: A last line of the note.

    Returns:
        The paths written (none when no probe result exists).
    """
    pools: dict[str, list] = {}
    for run_dir, path in probes:
        if not Path(path).exists():
            continue
        record = read_run(run_dir)
        label = f"{row_label(record.method, record.ablation, record.curvature)} {record.style}"
        pools.setdefault(label, []).append(read_json(path, what="curvature probe")["jensen"])
    if not pools:
        return []
    table = curvature_table(pools)
    table.note = "\n\n".join([table.note, made]).strip()
    return list(write_table(table, out_dir, "curvature"))
