"""Which methods the kit's tables show, which rows carry asserted claims, which rows share a run.

The names come from the method classes (``ITA.name``, ...), so this module quotes no method name:
the registry :data:`compolab.methods.METHODS` stays the one place that spells them.

Examples:
    >>> TABLE_METHODS
    ('ita', 'iel', 'tmc', 'naive', 'seq', 'joint')
    >>> CLAIM_METHODS, SAME_RUN
    (('ita', 'iel'), {('ita', 'no-reg'): ('naive', 'none')})
    >>> SEEDED_ROWS
    (('naive', 'lora'), ('ita', 'full'), ('naive', 'full'))
    >>> MERGED_POOLS[:3]
    (('ita', 'lora'), ('iel', 'lora'), ('naive', 'lora'))
    >>> CURVATURE_ROWS, SEEDED_CURVATURE_ROWS
    ((('ita', 'lora'), ('ita', 'full'), ('iel', 'lora'), ('iel', 'full')), (('ita', 'lora'), ('ita', 'full')))
"""

from __future__ import annotations

from compolab.methods.baselines import Joint, Naive, Sequential
from compolab.methods.ita_iel import IEL, ITA
from compolab.methods.tangent import TMC

__all__ = ["TABLE_METHODS", "CLAIM_METHODS", "SAME_RUN", "SEEDED_ROWS", "MERGED_POOLS", "CURVATURE_ROWS",
           "SEEDED_CURVATURE_ROWS", "CURVATURE_LABELS", "CURVATURE_POOLS"]

#: Rows of the kit's tables (:mod:`compolab.tables`, ``compolab reproduce``), in order: the paper's
#: methods, TMC, naive task arithmetic, then the references (sequential fine-tuning, joint).
TABLE_METHODS: tuple[str, ...] = tuple(m.name for m in (ITA, IEL, TMC, Naive, Sequential, Joint))
#: Rows of the tables that are one computation, ``(method, ablation) -> (method, ablation)``: ITA
#: without its penalties is naive task arithmetic (the pre-tuned heads are replaced by freshly
#: initialised ones in both; ``tests/test_run.py`` checks the modules are bit-identical).
SAME_RUN: dict[tuple[str, str], tuple[str, str]] = {(ITA.name, "no-reg"): (Naive.name, "none")}
#: The methods whose editing claims (unlearning, specialization) the tables assert over seeds.
CLAIM_METHODS: tuple[str, ...] = (ITA.name, IEL.name)
#: The other composition cells trained for every seed, ``(method, style)``: the regularisation gap
#: (ITA vs ITA without Eq. 12 = naive task arithmetic) in LoRA and full fine-tuning is asserted on a
#: mean over seeds, like the claim methods in the editing style.
SEEDED_ROWS: tuple[tuple[str, str], ...] = ((Naive.name, "lora"), (ITA.name, "full"), (Naive.name, "full"))
#: Rows trained again with K-FAC curvature (``--curvature kfac``, :mod:`compolab.kfac`) in place of the
#: paper's diagonal Fisher, ``(method, style)``: composition and FA-after-T rows only (no edits or
#: merges). The first ``SEEDED_CURVATURE_ROWS`` of them are trained for every seed (the notebook's
#: diagonal-vs-K-FAC claim is on a mean over seeds).
CURVATURE_ROWS: tuple[tuple[str, str], ...] = tuple((m.name, s) for m in (ITA, IEL) for s in ("lora", "full"))
SEEDED_CURVATURE_ROWS: tuple[tuple[str, str], ...] = CURVATURE_ROWS[:2]
#: The pools whose composition gap is measured against Ω of each curvature (the curvature table,
#: :mod:`compolab.tables.curvature`), ``(method, style, curvature)``, every seed: ITA with the paper's
#: diagonal penalty, ITA with a K-FAC penalty and naive task arithmetic, all fully fine-tuned.
CURVATURE_POOLS: tuple[tuple[str, str, str], ...] = (
    (ITA.name, "full", "diag"), (ITA.name, "full", "kfac"), (Naive.name, "full", "diag"),
)
#: How a row names a curvature other than the paper's diagonal.
CURVATURE_LABELS: dict[str, str] = {"kfac": "K-FAC curvature"}
#: The pools every merge of :mod:`compolab.merging` is applied to (seed 0), ``(method, style)``:
#: the columns of the merging table.
MERGED_POOLS: tuple[tuple[str, str], ...] = tuple(
    (m.name, style) for style in ("lora", "full") for m in (ITA, IEL, Naive)
)
