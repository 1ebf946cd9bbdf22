r"""``compolab reproduce``: every run the tables need (cached, resumable), the tables, every figure.

One command, one overall progress bar, four kinds of jobs:

1. **runs** (:func:`plan`) under ``cache``: the composition grid — every editable method of
   :data:`~compolab.tables.TABLE_METHODS` × tuning style, ITA and IEL also with their ablations
   ("without Eq. 12 / 19", "only on CLS"; a row that is another's computation,
   :data:`~compolab.tables.SAME_RUN`, is trained once), and the references (sequential
   fine-tuning, joint training) and TMC (one row in the paper's Table 1; its 8-epoch linearised
   run costs about four 3-epoch plain ones) once, in the editing style — for seed 0, and the
   methods whose editing claims are asserted (:data:`~compolab.tables.CLAIM_METHODS`) in the
   editing style for seeds 1 … N−1, like the other asserted composition rows
   (:data:`~compolab.tables.policy.SEEDED_ROWS`). The tiny preset trains the 10 tasks of ``tiny10``,
   :data:`~compolab.reproduce.plan.TINY_EPOCHS` epochs per task. A run's folder name carries a
   hash of its config: a finished run is reused, a killed one resumes (the kit's ``--resume``), a
   changed config is a new run;
2. **edits** of every editable pool of the editing style (:func:`compolab.measure.measure_edits`),
   cached as JSON next to the runs, and **merges** of the seed-0 pools of
   :data:`~compolab.tables.policy.MERGED_POOLS` (:func:`compolab.reproduce.runs.job_merges`: the
   pool's statistics, then every merge of :mod:`compolab.merging` with its validation grid and its
   second-order view), cached likewise (``merges=False`` skips them); the rows of
   :data:`~compolab.tables.policy.CURVATURE_ROWS` are trained a second time with K-FAC curvature
   (``kfac=False`` skips them);
3. **tables** under ``<out>/tables/``: composition, unlearning, specialization, FA after T tasks
   and the merging tables (markdown + CSV, :mod:`compolab.tables`), written as soon as the runs,
   edits and merges are done;
4. **notebooks** that save figures, executed in place by ``jupyter nbconvert`` (inline figures
   embedded, each figure also written to ``<out>`` through ``COMPOLAB_FIGURES_DIR``); a notebook
   that reads ``figures/tables`` runs after the tables. A notebook is skipped when neither its code nor the
   kit changed since it last ran into the same ``<out>``.

Jobs run on ``workers`` processes with one thread each (2 on the 2-core CPU the tiny preset
targets), runs first and the longest first. ``--plan`` lists the jobs and their estimated cost
without running anything.

The modules: :mod:`~compolab.reproduce.plan` (the config, the jobs, their cost),
:mod:`~compolab.reproduce.runs` (the job functions the workers call),
:mod:`~compolab.reproduce.notebooks` (nbconvert, a notebook's key and record) and
:mod:`~compolab.reproduce.schedule` (the worker pool; the tables through
:func:`compolab.tables.write.write_run_tables`).
"""

from __future__ import annotations

from compolab.reproduce.plan import Job, ReproduceConfig, format_plan, plan
from compolab.reproduce.schedule import reproduce

__all__ = ["ReproduceConfig", "Job", "plan", "reproduce", "format_plan"]
