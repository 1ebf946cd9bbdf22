"""An edit of a pool (:class:`Edit`) and what it does on the evaluation images (:class:`View`).

An edit is one point of the editing family of :mod:`compolab.editing`,
:math:`\theta_0 + \\sum_t c_t \tau_t` with :math:`c_t = w_t` (keep), 0 (drop) or :math:`-w_t`
(negate), plus which heads give the output classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compolab.errors import ConfigError

__all__ = ["MODES", "HEADS", "Edit", "View"]

#: What an edit does with each module: compose it with +w_t, leave it out, or subtract it (−w_t).
MODES = ("keep", "drop", "negate")
#: Output classes: every pool head, or only the heads of the kept modules (as ``compose_pool``).
HEADS = ("all", "composed")


@dataclass(frozen=True)
class Edit:
    """One composition of the pool.

    Attributes:
        coefs: The weight w_t of each module (in module order).
        modes: ``keep``, ``drop`` or ``negate`` per module (:data:`MODES`).
        heads: ``all`` (every head stays: the loss Eq. 2 expands) or ``composed`` (only the kept
            modules' heads: a dropped or negated task's classes leave the output, as in
            :func:`~compolab.editing.compose_pool`).
    """

    coefs: tuple[float, ...]
    modes: tuple[str, ...]
    heads: str = "all"

    def __post_init__(self) -> None:
        if len(self.coefs) != len(self.modes):
            raise ConfigError(
                f"an edit needs one mode per weight, got {len(self.coefs)} and {len(self.modes)}"
            )
        bad = [m for m in self.modes if m not in MODES]
        if bad or self.heads not in HEADS:
            raise ConfigError(
                f"modes must be in {MODES} and heads in {HEADS}, got {self.modes}, {self.heads!r}"
            )
        if not all(abs(float(c)) < float("inf") for c in self.coefs):
            raise ConfigError(f"weights must be finite numbers, got {self.coefs}")

    @property
    def effective(self) -> tuple[float, ...]:
        """:math:`c_t`: w_t, 0 or −w_t."""
        sign = {"keep": 1.0, "drop": 0.0, "negate": -1.0}
        return tuple(sign[m] * float(c) + 0.0 for c, m in zip(self.coefs, self.modes, strict=True))


@dataclass
class View:
    """What an edit does, on the evaluation images.

    Attributes:
        edit: The edit.
        accuracy: ``{task: accuracy %}`` with the edit's output heads.
        roles: ``{task: "target" | "control"}`` — target tasks are dropped or negated.
        loss: The measured multi-task loss (mean over tasks, every head).
        predicted: Its second-order prediction from θ0 (Eq. 2).
        plane: ``(a, b)``: the composition's coordinates on the plane θ0 + a τ_i + b τ_j.
        off_plane: ‖Δ − (a τ_i + b τ_j)‖ / ‖Δ‖, the part of Δ the plane does not show.
        seconds: Wall time of :meth:`Explorer.evaluate`.
        cached: True when the logits came from the cache (a head-only edit).
    """

    edit: Edit
    accuracy: dict[int, float]
    roles: dict[int, str]
    loss: float
    predicted: float
    plane: tuple[float, float]
    off_plane: float
    seconds: float = 0.0
    cached: bool = False
    per_task_loss: dict[int, float] = field(default_factory=dict)

    def mean_accuracy(self, role: str) -> float:
        """Mean accuracy over the tasks of one role (NaN when there is none)."""
        values = [a for t, a in self.accuracy.items() if self.roles[t] == role]
        return sum(values) / len(values) if values else float("nan")
