r"""Model merging: pure functions from task vectors :math:`\tau_t` to one merged :math:`\tau`.

Every merge is ``merge_fn(taus, *, <hyper-parameters>, [fishers | grams | kfacs]) -> dict[str, Tensor]``:
``taus`` is a sequence of ``Mapping[str, Tensor]`` (e.g. :class:`~compolab.task_vector.TaskVector`)
with the same keys, shapes and dtypes; the result has those keys, shapes and dtypes; inputs are
never modified, and the inputs are checked before any work. The merged model is
:math:`\theta_0 + \tau`: ``TaskVector(tau).apply_to(model)``, or
``compose(theta0, [TaskVector(tau)], [1.0])``.

* ``task-arithmetic``: :func:`~compolab.merging.task_arithmetic.task_arithmetic`
* ``ties``: :func:`~compolab.merging.ties.ties`
* ``dare`` and ``dare-ties``: :func:`~compolab.merging.dare.dare`, :func:`~compolab.merging.dare.dare_ties`
* ``fisher``: :func:`~compolab.merging.fisher_merging.fisher_merging` (needs ``fishers``)
* ``regmean``: :func:`~compolab.merging.regmean.regmean` (needs ``grams``)
* ``kfac``: :func:`~compolab.merging.kfac_merging.kfac_merging`, Fisher merging with per-task K-FAC
  factors (needs ``kfacs``; no data of any task)
* ``tsv``: :func:`~compolab.merging.tsv.tsv_m`
* ``iso-c``: :func:`~compolab.merging.iso.iso_c`
* ``magmax``: :func:`~compolab.merging.magmax.magmax`
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from compolab.errors import ConfigError
from compolab.merging import (
    dare,
    fisher_merging,
    iso,
    kfac_merging,
    magmax,
    regmean,
    task_arithmetic,
    ties,
    tsv,
)
from compolab.merging._common import Taus

# The functions stay in their modules (``from compolab.merging.ties import ties``): re-exporting
# them here would shadow the submodules of the same name.
__all__ = ["MERGES", "Merge", "merge"]


@dataclass(frozen=True)
class Merge:
    """A merge of the registry: callable like its function.

    Attributes:
        name: The registry name (``"ties"``, ...).
        function: The pure merge function.
        needs: The per-task statistics it takes besides ``taus``, by keyword: ``"fishers"``
            (diagonal Fishers), ``"grams"`` (input Gram matrices) or ``"kfacs"`` (one
            :class:`~compolab.kfac.KFAC` per task); empty for the merges that
            need only the task vectors. None of them needs :math:`\\theta_0`.
    """

    name: str
    function: Callable[..., dict[str, Tensor]]
    needs: frozenset[str] = frozenset()

    def __call__(self, taus: Taus, **kwargs: Any) -> dict[str, Tensor]:
        return self.function(taus, **kwargs)


#: Every merge by name, in the order of the list above.
MERGES: dict[str, Merge] = {
    m.name: m
    for m in (
        Merge("task-arithmetic", task_arithmetic.task_arithmetic),
        Merge("ties", ties.ties),
        Merge("dare", dare.dare),
        Merge("dare-ties", dare.dare_ties),
        Merge("fisher", fisher_merging.fisher_merging, frozenset({"fishers"})),
        Merge("regmean", regmean.regmean, frozenset({"grams"})),
        Merge("kfac", kfac_merging.kfac_merging, frozenset({"kfacs"})),
        Merge("tsv", tsv.tsv_m),
        Merge("iso-c", iso.iso_c),
        Merge("magmax", magmax.magmax),
    )
}


def merge(name: str, taus: Taus, **kwargs: Any) -> dict[str, Tensor]:
    """The merge called ``name`` applied to ``taus`` with its keyword arguments.

    Args:
        name: A key of :data:`MERGES`.
        taus: The task vectors :math:`\\tau_t`.
        **kwargs: The merge's hyper-parameters and the statistics in its ``needs``.

    Returns:
        The merged :math:`\\tau`.

    Raises:
        ConfigError: If ``name`` is not a merge (the message lists the known ones), a statistic
            the merge needs is not given, or the merge rejects its inputs.

    Examples:
        >>> import torch
        >>> merge("magmax", [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([-3.0, 1.0])}])["w"]
        tensor([-3., -2.])
    """
    if name not in MERGES:
        raise ConfigError(f"`name` {name!r} is not a merge; known merges: {', '.join(MERGES)}")
    missing = sorted(MERGES[name].needs - kwargs.keys())
    if missing:
        raise ConfigError(f"merge {name!r} needs per-task statistics {', '.join(f'`{n}`' for n in missing)}")
    return MERGES[name](taus, **kwargs)
