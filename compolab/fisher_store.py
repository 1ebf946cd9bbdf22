"""Diagonal Fishers as values: summing, normalising, saving, and the ITA / IEL running means.

A :class:`DiagonalFisher` keeps the Fisher **summed** over samples together with the number of
samples, so that Fishers of several loaders (or tasks) add exactly; :meth:`DiagonalFisher.mean` gives
the per-sample mean :math:`\\bar F` used in the penalties. :class:`FisherAccumulator` reproduces how
the official code normalises per-task Fishers for ITA and IEL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from compolab.errors import CompolabError, ConfigError
from compolab.io import read_safetensors, write_safetensors
from compolab.task_vector import key_mismatch

__all__ = ["PAPER_FISHER_FLOOR", "DiagonalFisher", "FisherAccumulator"]

#: The official code's damping of every Fisher (its ``1e-5`` floors).
PAPER_FISHER_FLOOR = 1e-5
_FORMAT = "compolab.DiagonalFisher/1"


@dataclass(frozen=True, eq=False)
class DiagonalFisher:
    """A diagonal Fisher summed over ``num_samples`` samples, keyed by the model's parameter names.

    Attributes:
        values: ``name -> tensor`` of :math:`\\sum_n F_n` (non-negative, the parameter's shape).
        num_samples: How many samples were summed.

    Examples:
        >>> import torch
        >>> f = DiagonalFisher({"w": torch.tensor([2.0, 4.0])}, num_samples=2)
        >>> (f + f).mean()["w"]
        tensor([1., 2.])
        >>> float(f.quadratic({"w": torch.tensor([1.0, 0.5])}))  # 1 * 1 + 2 * 0.25
        1.5
    """

    values: dict[str, Tensor]
    num_samples: int

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {self.num_samples}")
        bad = [k for k, v in self.values.items() if not isinstance(v, Tensor)]
        if bad:
            raise ConfigError(f"Fisher values must be tensors; not tensors: {bad}")

    def __getitem__(self, name: str) -> Tensor:
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def keys(self):  # noqa: D102 - as for a dict
        return self.values.keys()

    def __repr__(self) -> str:
        numel = sum(v.numel() for v in self.values.values())
        return f"DiagonalFisher({len(self)} tensors, {numel:,} numbers, {self.num_samples} samples)"

    def __add__(self, other: object) -> DiagonalFisher:
        """Fisher of the union of both sample sets (sums values and counts)."""
        if not isinstance(other, DiagonalFisher):
            return NotImplemented
        if problem := key_mismatch(self.values, other.values):
            raise ConfigError(f"cannot add Fishers with different parameters: {problem}")
        summed = {k: v + other.values[k].to(v.device) for k, v in self.values.items()}
        return DiagonalFisher(summed, self.num_samples + other.num_samples)

    def __radd__(self, other: object) -> DiagonalFisher:
        """Lets ``sum(fishers)`` start from 0."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def mean(self, floor: float = 0.0) -> dict[str, Tensor]:
        """Per-sample mean :math:`\\bar F = \\text{floor} + \\frac{1}{N} \\sum_n F_n`.

        Args:
            floor: Added after normalising (the paper uses :data:`PAPER_FISHER_FLOOR`).

        Raises:
            ConfigError: If the Fisher holds no samples.
        """
        if self.num_samples == 0:
            raise ConfigError("the mean of a Fisher over 0 samples is undefined")
        return {k: v / self.num_samples + floor for k, v in self.values.items()}

    def quadratic(self, delta: Mapping[str, Tensor], *, floor: float = 0.0, strict: bool = True) -> Tensor:
        """:math:`\\sum_i \\bar F_i \\, \\delta_i^2`: the diagonal quadratic form of the mean Fisher.

        Half of it approximates the KL divergence between the model at :math:`\\theta` and at
        :math:`\\theta + \\delta`. Differentiable in ``delta``.

        Args:
            delta: A displacement (e.g. a task vector), keyed like the Fisher.
            floor: Passed to :meth:`mean`.
            strict: If False, keys of ``delta`` that the Fisher lacks are ignored.

        Raises:
            ConfigError: If ``delta`` lacks a key of the Fisher (or, when strict, has extra keys).
        """
        problem = key_mismatch(self.values, {k: v for k, v in delta.items() if strict or k in self.values})
        if problem:
            raise ConfigError(f"delta does not match the Fisher: {problem}")
        mean = self.mean(floor)
        terms = [(mean[k].to(delta[k]) * delta[k].square()).sum() for k in self.values]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def to(self, *args, **kwargs) -> DiagonalFisher:
        """Moved or cast copy (arguments as for ``Tensor.to``)."""
        return DiagonalFisher({k: v.to(*args, **kwargs) for k, v in self.values.items()}, self.num_samples)

    def save(self, path: str | Path) -> None:
        """Write a safetensors file whose header metadata holds the sample count (atomically)."""
        meta = {"format": _FORMAT, "num_samples": self.num_samples}
        write_safetensors(path, self.values, metadata={"compolab": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> DiagonalFisher:
        """Read a file written by :meth:`save`.

        Raises:
            CompolabError: If the file is missing, damaged, or not a saved Fisher.
        """
        values, meta = read_safetensors(path, what="a Fisher", device=device)
        if meta.get("format") != _FORMAT:
            raise CompolabError(f"{path} is not a saved DiagonalFisher (format {meta.get('format')!r})")
        return cls(values, int(meta["num_samples"]))


class FisherAccumulator:
    """Running sums of per-task Fishers, normalised as ITA and IEL do.

    Call :meth:`add_task` with :math:`f_t` (summed over the :math:`n_t` samples of task ``t``) at the
    start of each task, then read the matrix of the *current* task ``t`` (the last one added):

    * :meth:`ita`: mean per-example Fisher of the **previous** tasks, with the prior inside the
      un-normalised buffer, :math:`\\bar F^{ITA}_t = (\\epsilon + \\sum_{s<t} f_s) / N^{prev}_t`; at
      :math:`t = 0` the prior :math:`\\epsilon` alone (the first task is effectively unregularised). This
      is the *net* matrix of the official code: its coefficient :math:`\\alpha T / N^{prev}_t` (``2\\alpha``
      at t = 0) times ``scale_by_t`` :math:`1/T` leaves :math:`\\alpha \\bar F^{ITA}_t \\odot \\Delta W`;
    * :meth:`iel`: running mean over all tasks **including** the current one,
      :math:`\\bar F^{IEL}_t = \\epsilon + \\sum_{s\\le t} f_s / \\sum_{s\\le t} n_s`.

    Only running sums are kept (memory independent of the number of tasks), so only the current
    task can be queried.

    Args:
        prior: :math:`\\epsilon`, the official ``1e-5``.
        official_bookkeeping: The official normaliser :math:`N^{prev}_t = n_0 + \\sum_{s=0}^{t-2} n_s`
            (counts :math:`n_0` twice and omits :math:`n_{t-1}`). Default
            False: the fixed :math:`\\sum_{s<t} n_s`. Both agree when all tasks have the same size.

    Examples:
        >>> import torch
        >>> acc = FisherAccumulator(prior=0.0)
        >>> for f, n in ((2.0, 1), (6.0, 3)):
        ...     acc.add_task(DiagonalFisher({"w": torch.tensor([f])}, n))
        >>> acc.ita(1)["w"], acc.iel(1)["w"]  # 2 / 1 and (2 + 6) / (1 + 3)
        (tensor([2.]), tensor([2.]))
    """

    def __init__(self, *, prior: float = PAPER_FISHER_FLOOR, official_bookkeeping: bool = False) -> None:
        if prior < 0:
            raise ConfigError(f"prior must be >= 0, got {prior}")
        self.prior = prior
        self.official_bookkeeping = official_bookkeeping
        self.counts: list[int] = []
        self._previous: dict[str, Tensor] = {}  # Σ_{s<t} f_s
        self._all: dict[str, Tensor] = {}  # Σ_{s≤t} f_s

    @property
    def num_tasks(self) -> int:
        """Tasks added so far; the current task is ``num_tasks - 1``."""
        return len(self.counts)

    def add_task(self, fisher: DiagonalFisher) -> None:
        """Start a new task with its Fisher :math:`f_t` (summed over its samples)."""
        if fisher.num_samples == 0:
            raise ConfigError("a task Fisher needs at least one sample")
        if self._all and (problem := key_mismatch(self._all, fisher.values)):
            raise ConfigError(f"task {self.num_tasks} Fisher does not match the earlier ones: {problem}")
        self._previous = {k: v.clone() for k, v in self._all.items()}
        self._all = {k: self._all[k] + v if self._all else v.clone() for k, v in fisher.values.items()}
        self.counts.append(fisher.num_samples)

    def num_previous(self, t: int | None = None) -> int:
        """The ITA normaliser :math:`N^{prev}_t` (0 at ``t = 0``)."""
        t = self._current(t)
        if t == 0:
            return 0
        if self.official_bookkeeping:
            return self.counts[0] + sum(self.counts[: t - 1])
        return sum(self.counts[:t])

    def ita(self, t: int | None = None) -> dict[str, Tensor]:
        """:math:`\\bar F` of the ITA penalty for the current task (previous tasks only)."""
        t = self._current(t)
        if t == 0:
            return {k: torch.full_like(v, self.prior) for k, v in self._all.items()}
        n_prev = self.num_previous(t)
        return {k: (self.prior + v) / n_prev for k, v in self._previous.items()}

    def iel(self, t: int | None = None) -> dict[str, Tensor]:
        """:math:`\\bar F` of the IEL penalty for the current task (all tasks so far, current included)."""
        t = self._current(t)
        n_all = sum(self.counts[: t + 1])
        return {k: self.prior + v / n_all for k, v in self._all.items()}

    def _current(self, t: int | None) -> int:
        if not self.counts:
            raise ConfigError("no task added yet: call add_task(fisher) first")
        current = self.num_tasks - 1
        if t is not None and t != current:
            raise ConfigError(f"the accumulator is at task {current}; it keeps running sums, not task {t}")
        return current
