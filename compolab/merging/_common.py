r"""What the merges share: one validation pass over the inputs before any work, and small helpers.

Every merge maps task vectors :math:`\tau_t` (``taus[t]``, any ``Mapping[str, Tensor]``, e.g. a
:class:`~compolab.task_vector.TaskVector`) to one merged :math:`\tau` with the same keys (in the
order of ``taus[0]``), shapes and dtypes; none of them mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from compolab.errors import ConfigError
from compolab.task_vector import key_mismatch

Taus = Sequence[Mapping[str, Tensor]]


def check_taus(taus: Taus) -> list[str]:
    """The keys of ``taus[0]``, once every task vector has the same keys, shapes and dtypes.

    Raises:
        ConfigError: If ``taus`` is empty, holds a non-floating-point entry, or two task vectors
            differ in keys (named), shapes or dtypes.
    """
    if len(taus) == 0:
        raise ConfigError("`taus` is empty: a merge needs at least one task vector")
    keys = list(taus[0])
    for t, tau in enumerate(taus):
        bad = sorted(k for k, v in tau.items() if not (isinstance(v, Tensor) and v.is_floating_point()))
        if bad:
            raise ConfigError(f"`taus`: task {t} has entries that are not floating-point tensors: {bad}")
        if problem := key_mismatch(taus[0], tau):
            raise ConfigError(f"`taus`: task {t} does not match task 0: {problem}")
        dtypes = [
            f"{k} {taus[0][k].dtype} vs {tau[k].dtype}" for k in keys if tau[k].dtype != taus[0][k].dtype
        ]
        if dtypes:
            raise ConfigError(f"`taus`: task {t} does not match task 0: mismatched dtypes {dtypes}")
    return keys


def check_aligned(name: str, stats: Sequence[object], taus: Taus) -> None:
    """Raise unless there is one statistic (Fisher, Gram set, coefficient) per task vector.

    Raises:
        ConfigError: Naming ``name`` when the lengths differ.
    """
    if len(stats) != len(taus):
        raise ConfigError(f"`{name}` has {len(stats)} entries, expected one per task vector ({len(taus)})")


def check_in(name: str, value: float, interval: str) -> None:
    """Raise unless ``value`` lies in ``interval``, written like ``"(0, 1]"`` or ``"[0, inf)"``.

    Raises:
        ConfigError: Naming ``name``, the interval and the value (NaN is never inside).

    Examples:
        >>> check_in("density", 0.2, "(0, 1]")
        >>> check_in("density", 0.0, "(0, 1]")
        Traceback (most recent call last):
        ...
        compolab.errors.ConfigError: `density` must be in (0, 1], got 0.0
    """
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = low < value if interval[0] == "(" else low <= value
    below = value < high if interval[-1] == ")" else value <= high
    if not (above and below):
        raise ConfigError(f"`{name}` must be in {interval}, got {value}")


def stack(taus: Taus, key: str) -> Tensor:
    """The ``key`` entries of all task vectors, shape ``(T, *shape)``."""
    return torch.stack([tau[key] for tau in taus])


def linalg_dtype(x: Tensor) -> torch.dtype:
    """The dtype to run an SVD / solve in: float32 for half-precision tensors, else their own."""
    return torch.promote_types(x.dtype, torch.float32)
