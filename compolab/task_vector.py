"""Task vectors: the weight-space differences :math:`\\tau_t = \\theta_t - \\theta_0`.

A :class:`TaskVector` is an immutable ``Mapping[str, Tensor]`` keyed by the model's own parameter
names. It is a vector: ``+``, ``-``, scalar ``*`` and ``/`` are the only operators; everything else
(``dot``, ``norm``, ``map``, ...) is a method. The composed model of the paper,
:math:`\\theta_P = \\theta_0 + \\sum_t w_t \\tau_t`, is :func:`compose`.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from compolab.errors import ConfigError

__all__ = ["TaskVector", "compose", "key_mismatch", "uniform_coefs"]

Scalar = float | int | Tensor


def _is_scalar(x: object) -> bool:
    return isinstance(x, numbers.Real) or (isinstance(x, Tensor) and x.ndim == 0)


def key_mismatch(left: Mapping[str, Tensor], right: Mapping[str, Tensor]) -> str:
    """Empty when both have the same keys and shapes, else a listing of the differences.

    Examples:
        >>> key_mismatch({"a": torch.zeros(2), "b": torch.ones(1)}, {"a": torch.ones(3), "c": torch.ones(1)})
        "missing keys ['b']; extra keys ['c']; mismatched shapes ['a (2,) vs (3,)']"
    """
    missing = sorted(k for k in left if k not in right)
    extra = sorted(k for k in right if k not in left)
    shapes = [
        f"{k} {tuple(left[k].shape)} vs {tuple(right[k].shape)}"
        for k in sorted(left)
        if k in right and left[k].shape != right[k].shape
    ]
    parts = [f"missing keys {missing}"] * bool(missing) + [f"extra keys {extra}"] * bool(extra)
    parts += [f"mismatched shapes {shapes}"] * bool(shapes)
    return "; ".join(parts)


def uniform_coefs(num: int) -> list[float]:
    """The paper's composition weights :math:`w_t = 1/T` for ``num`` = T modules (none for T = 0).

    Examples:
        >>> uniform_coefs(4), uniform_coefs(0)
        ([0.25, 0.25, 0.25, 0.25], [])
    """
    return [1.0 / num] * num if num > 0 else []


def _misfit(tau: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> str:
    """Empty when every key of ``tau`` is in ``target`` with the same shape."""
    return key_mismatch(tau, {k: target[k] for k in tau if k in target})


def _floating_names(state: Mapping[str, Tensor], names: Sequence[str] | None) -> list[str]:
    if names is None:  # integer buffers (BatchNorm's num_batches_tracked) are not weights
        return [n for n, t in state.items() if t.is_floating_point()]
    missing = [n for n in names if n not in state]
    if missing:
        raise ConfigError(f"names not in the state: {missing}")
    return list(names)


class TaskVector(Mapping[str, Tensor]):
    """An immutable vector of named tensors, :math:`\\tau = \\theta_t - \\theta_0`.

    Binary operations need the same keys and shapes on both sides. Tensors keep their autograd
    history, so a task vector built from trainable parameters can enter a loss.

    Args:
        tensors: ``name -> tensor``, with the names of the model's parameters.

    Raises:
        ConfigError: If a value is not a tensor.

    Examples:
        >>> import torch
        >>> tau = TaskVector({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])})
        >>> float(tau.norm())  # sqrt(3^2 + 4^2)
        5.0
        >>> float((2 * tau - tau / 2).dot(tau))  # 1.5 * 25
        37.5
        >>> sum([tau, -tau]) == TaskVector.zeros_like(tau)
        True
    """

    __slots__ = ("_tensors",)

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise ConfigError(f"task vector values must be tensors; not tensors: {bad}")
        self._tensors: dict[str, Tensor] = dict(tensors)

    # --- constructors (pure: no file I/O) -------------------------------------------------------

    @classmethod
    def from_state_dicts(
        cls,
        theta0: Mapping[str, Tensor],
        theta_t: Mapping[str, Tensor],
        names: Sequence[str] | None = None,
    ) -> TaskVector:
        """:math:`\\tau = \\theta_t - \\theta_0`, detached, over floating-point entries.

        Args:
            theta0: Pre-trained state :math:`\\theta_0`.
            theta_t: Fine-tuned state :math:`\\theta_t`.
            names: Entries to keep; default: every floating-point entry of ``theta0`` (integer
                buffers are skipped).

        Returns:
            The task vector.

        Raises:
            ConfigError: If the two states differ in keys or shapes over ``names``.
        """
        keep = _floating_names(theta0, names)
        other = keep if names is not None else _floating_names(theta_t, None)
        right = {n: theta_t[n] for n in other if n in theta_t}
        if problem := key_mismatch({n: theta0[n] for n in keep}, right):
            raise ConfigError(f"theta0 and theta_t do not match: {problem}")
        return cls({n: theta_t[n].detach() - theta0[n].detach() for n in keep})

    @classmethod
    def from_models(
        cls, pretrained: nn.Module, finetuned: nn.Module, names: Sequence[str] | None = None
    ) -> TaskVector:
        """The task vector between two models of the same architecture (their state dicts).

        Args:
            pretrained: The model at :math:`\\theta_0`.
            finetuned: The model at :math:`\\theta_t`.
            names: Entries to keep (e.g. ``tuned_weight_names(model)``); default: all
                floating-point parameters and buffers.

        Returns:
            :math:`\\theta_t - \\theta_0`.

        Raises:
            ConfigError: If the state dicts differ in keys or shapes.
        """
        return cls.from_state_dicts(pretrained.state_dict(), finetuned.state_dict(), names)

    @classmethod
    def zeros_like(
        cls, template: nn.Module | Mapping[str, Tensor], names: Sequence[str] | None = None
    ) -> TaskVector:
        """A zero task vector with the keys, shapes, dtypes and devices of ``template``.

        Args:
            template: A model (its state dict) or any mapping of tensors.
            names: Entries to keep; default: every floating-point entry.

        Returns:
            The zero vector.
        """
        state = template.state_dict() if isinstance(template, nn.Module) else template
        return cls({n: torch.zeros_like(state[n]) for n in _floating_names(state, names)})

    # --- Mapping ---------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, {self.numel():,} numbers)"

    def __eq__(self, other: object) -> bool:
        """Exact equality: same keys, shapes and values (use :meth:`allclose` for floats)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return not key_mismatch(self, other) and all(torch.equal(t, other[k]) for k, t in self.items())

    __hash__ = None  # type: ignore[assignment]

    # --- vector-space operators ------------------------------------------------------------------

    def zip_with(
        self, other: Mapping[str, Tensor], fn: Callable[[Tensor, Tensor], Tensor]
    ) -> TaskVector:
        """``fn`` applied key by key to two vectors with the same keys and shapes.

        Raises:
            ConfigError: Listing the keys missing from ``other``, the extra ones, and the names
                whose shapes differ.
        """
        if problem := key_mismatch(self, other):
            raise ConfigError(f"task vectors do not match: {problem}")
        return TaskVector({k: fn(t, other[k]) for k, t in self.items()})

    def map(self, fn: Callable[[Tensor], Tensor]) -> TaskVector:
        """``fn`` applied to every tensor."""
        return TaskVector({k: fn(t) for k, t in self.items()})

    def __add__(self, other: object) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self.zip_with(other, torch.add)

    def __radd__(self, other: object) -> TaskVector:
        if isinstance(other, numbers.Number) and other == 0:  # so that sum(taus) works
            return self
        return NotImplemented

    def __sub__(self, other: object) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self.zip_with(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return self.map(torch.neg)

    def __mul__(self, coef: object) -> TaskVector:
        if not _is_scalar(coef):  # no Hadamard product: use zip_with(other, torch.mul)
            return NotImplemented
        return self.map(lambda t: t * coef)

    __rmul__ = __mul__

    def __truediv__(self, coef: object) -> TaskVector:
        if not _is_scalar(coef):
            return NotImplemented
        return self.map(lambda t: t / coef)

    # --- inner products and norms ----------------------------------------------------------------

    def dot(self, other: Mapping[str, Tensor]) -> Tensor:
        """:math:`\\langle \\tau, \\tau' \\rangle = \\sum_i \\tau_i \\tau'_i` (a 0-d tensor).

        Raises:
            ConfigError: If the keys or shapes differ.
        """
        terms = self.zip_with(other, lambda a, b: (a * b).sum())
        return torch.stack(list(terms.values())).sum() if terms else torch.zeros(())

    def fisher_dot(self, other: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> Tensor:
        """The inner product weighted by a diagonal Fisher, :math:`\\sum_i F_i \\tau_i \\tau'_i`.

        Args:
            other: The second vector :math:`\\tau'`.
            fisher: Diagonal Fisher :math:`F`, same keys and shapes.

        Returns:
            A 0-d tensor.

        Raises:
            ConfigError: If the keys or shapes of ``other`` or ``fisher`` differ.
        """
        return self.zip_with(fisher, torch.mul).dot(other)

    def norm(self) -> Tensor:
        """:math:`\\lVert\\tau\\rVert_2 = \\sqrt{\\sum_i \\tau_i^2}`, with gradient 0 at 0."""
        if not self:
            return torch.zeros(())
        norms = torch.stack([torch.linalg.vector_norm(t) for t in self.values()])
        return torch.linalg.vector_norm(norms)  # not sqrt(dot): its gradient at 0 is NaN

    def weighted_norm(self, fisher: Mapping[str, Tensor]) -> Tensor:
        """:math:`\\sqrt{\\sum_i F_i \\tau_i^2}` for a non-negative diagonal Fisher :math:`F`.

        Raises:
            ConfigError: If the keys or shapes of ``fisher`` differ.
        """
        return self.zip_with(fisher, lambda t, f: f.sqrt() * t).norm()

    def cosine(self, other: Mapping[str, Tensor]) -> Tensor:
        """:math:`\\langle\\tau,\\tau'\\rangle / (\\lVert\\tau\\rVert\\,\\lVert\\tau'\\rVert)`."""
        return self.dot(other) / (self.norm() * TaskVector(other).norm())

    # --- conversions -----------------------------------------------------------------------------

    def numel(self) -> int:
        """Total number of entries."""
        return sum(t.numel() for t in self.values())

    def flatten(self) -> Tensor:
        """All entries concatenated in key order, shape ``(numel,)``."""
        return torch.cat([t.reshape(-1) for t in self.values()])

    def to(self, *args: Any, **kwargs: Any) -> TaskVector:
        """Every tensor through :meth:`torch.Tensor.to` (device and/or dtype)."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> TaskVector:
        """Every tensor detached from autograd (freeze a trained module's delta)."""
        return self.map(torch.Tensor.detach)

    def allclose(
        self, other: Mapping[str, Tensor], *, rtol: float = 1e-5, atol: float = 1e-8
    ) -> bool:
        """True when keys and shapes match and every tensor is close (:func:`torch.allclose`)."""
        if key_mismatch(self, other):
            return False
        return all(torch.allclose(t, other[k], rtol=rtol, atol=atol) for k, t in self.items())

    def apply_to(self, model: nn.Module, coef: float = 1.0) -> nn.Module:
        """A new model (deep copy) at :math:`\\theta_0 + c\\,\\tau`, where ``model`` is at θ0.

        Args:
            model: The model to start from; it is not modified.
            coef: The scaling :math:`c` (negative to unlearn).

        Returns:
            The new model.

        Raises:
            ConfigError: Listing the names not in the model ("missing keys") and the names
                whose shapes differ.
        """
        new = copy.deepcopy(model)
        state = dict(new.named_parameters()) | dict(new.named_buffers())
        if problem := _misfit(self, state):
            raise ConfigError(f"task vector does not fit the model: {problem}")
        with torch.no_grad():
            for name, tau in self.items():
                state[name].add_(coef * tau.to(state[name]))
        return new


def compose(
    theta0: Mapping[str, Tensor],
    taus: Sequence[TaskVector],
    coefs: Sequence[Scalar] | None = None,
) -> dict[str, Tensor]:
    """The composed parameters :math:`\\theta_P = \\theta_0 + \\sum_t w_t \\tau_t`.

    Args:
        theta0: :math:`\\theta_0`, any mapping of tensors (e.g. all named parameters).
        taus: The task vectors :math:`\\tau_t`; each one's keys must be in ``theta0``.
        coefs: The weights :math:`w_t`; default :math:`1/T` each, as in the paper's code.

    Returns:
        A new dict with every key of ``theta0``, ready for :func:`torch.func.functional_call`.
        Entries no task vector touches are ``theta0``'s own tensors.

    Raises:
        ConfigError: If ``coefs`` has the wrong length, or a task vector has a name not in
            ``theta0`` or a different shape.
    """
    coefs = uniform_coefs(len(taus)) if coefs is None else list(coefs)
    if len(coefs) != len(taus):
        raise ConfigError(f"compose: expected {len(taus)} coefs (one per tau), got {len(coefs)}")
    params = dict(theta0)
    for t, (tau, w) in enumerate(zip(taus, coefs, strict=True)):
        if problem := _misfit(tau, theta0):
            raise ConfigError(f"compose: taus[{t}] does not fit theta0: {problem}")
        for name, delta in tau.items():
            params[name] = params[name] + w * delta
    return params
