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
:func:`write_table` (read back by :func:`read_table`); which methods the tables show is
:mod:`compolab.tables.policy`, and :func:`compolab.tables.write.write_run_tables` writes the
three tables of a set of run folders.
"""

from __future__ import annotations

from compolab.tables.build import (
    RunRecord,
    composition_table,
    fa_by_tasks_table,
    specialization_table,
    unlearning_table,
)
from compolab.tables.policy import CLAIM_METHODS, SAME_RUN, TABLE_METHODS
from compolab.tables.table import Stat, Table, read_table, side_by_side, write_table

__all__ = [
    "Stat",
    "Table",
    "RunRecord",
    "composition_table",
    "fa_by_tasks_table",
    "unlearning_table",
    "specialization_table",
    "write_table",
    "read_table",
    "side_by_side",
    "TABLE_METHODS",
    "CLAIM_METHODS",
    "SAME_RUN",
]
