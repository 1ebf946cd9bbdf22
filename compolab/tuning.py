"""The three tuning styles of the paper behind one interface, :class:`TaskModule`.

A task module holds the trainable tensors of one task for a fixed tuple of target weights
(``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of every block, from
:func:`compolab.models.tuned_weight_names`). Whatever the style, :meth:`TaskModule.delta` returns
the dense task vector :math:`\\tau` (one :math:`\\Delta W` per target), so composition, Fisher
penalties and serialisation never need to know the style. Per target :math:`W_0` (out×in):

* ``full``: :math:`\\Delta W = D`, :math:`D \\in R^{out\\times in}` initialised to zeros.
* ``lora``: :math:`\\Delta W = BA`, :math:`A \\in R^{r'\\times in}` uniform, :math:`B \\in
  R^{out\\times r'}` zeros, :math:`r' = 3r` on ``attn.qkv`` and :math:`r` elsewhere; no
  :math:`\\alpha/r` scaling.
* ``ia3``: :math:`\\Delta W = W_0 \\odot (\\ell - 1)`, :math:`\\ell \\in R^{out}` initialised to
  ones (a scaling of the output rows).

The trainable tensors live in ``nn.ParameterList`` objects aligned with :attr:`TaskModule.names`;
no attribute name is ever built from a parameter name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from compolab.errors import ConfigError
from compolab.task_vector import TaskVector

__all__ = ["STYLES", "TaskModule", "FullModule", "LoRAModule", "IA3Module"]

#: Separator between a target name and a tensor role in :meth:`TaskModule.state_tensors` keys.
KEY_SEPARATOR = "::"


class TaskModule(nn.Module):
    """One task's trainable tensors for the target weights ``names``; see the module docstring.

    Build one with :meth:`create` (fresh, for training) or :meth:`from_state_tensors` (stored).
    Subclasses hold one ``nn.ParameterList`` per tensor role, aligned with :attr:`names`, and say
    how a target's :math:`\\Delta W` is formed.

    Attributes:
        names: The target weight names, in a fixed order.
    """

    style: ClassVar[str]
    #: The tensor roles, in the order the subclass constructor takes them.
    roles: ClassVar[tuple[str, ...]]

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names: tuple[str, ...] = tuple(names)

    # --- what a style defines --------------------------------------------------------------------

    def tensor_lists(self) -> dict[str, nn.ParameterList]:
        """``role -> ParameterList`` (aligned with :attr:`names`)."""
        raise NotImplementedError

    def delta_weight(self, i: int, w0: Tensor) -> Tensor:
        """:math:`\\Delta W` of target ``i``, whose pre-trained weight is ``w0`` (out×in)."""
        raise NotImplementedError

    @classmethod
    def initial_tensors(
        cls, name: str, w0: Tensor, *, rank: int, generator: torch.Generator | None
    ) -> tuple[Tensor, ...]:
        """Freshly initialised tensors of one target, one per role."""
        raise NotImplementedError

    # --- one interface ---------------------------------------------------------------------------

    @staticmethod
    def create(
        style: str,
        theta0: Mapping[str, Tensor],
        names: Sequence[str],
        *,
        rank: int = 16,
        generator: torch.Generator | None = None,
    ) -> TaskModule:
        """A fresh module, on the dtype and device of ``theta0``; its delta is exactly zero.

        Args:
            style: ``"full"``, ``"lora"`` or ``"ia3"``.
            theta0: Pre-trained weights :math:`\\theta_0` (at least the targets).
            names: Target weight names, 2-D each (or 1×1 convolutions, ``(out, in, 1, 1)``).
            rank: LoRA rank :math:`r` (``3r`` on ``attn.qkv``); ignored by the other styles.
            generator: Random source of LoRA's ``A`` (on ``theta0``'s device).

        Returns:
            The module (a :class:`FullModule`, :class:`LoRAModule` or :class:`IA3Module`).

        Raises:
            ConfigError: For an unknown style, a bad rank, or a target missing from ``theta0``
                or not 2-D.
        """
        module_cls = _style_class(style)
        if rank <= 0:
            raise ConfigError(f"rank must be > 0, got {rank}")
        _check_targets(theta0, names)
        columns: list[list[Tensor]] = [[] for _ in module_cls.roles]  # one list per role
        for name in names:
            fresh = module_cls.initial_tensors(name, theta0[name], rank=rank, generator=generator)
            for column, tensor in zip(columns, fresh, strict=True):
                column.append(tensor)
        return module_cls(names, *columns)

    @staticmethod
    def from_state_tensors(
        style: str, names: Sequence[str], tensors: Mapping[str, Tensor]
    ) -> TaskModule:
        """Rebuild a module from :meth:`state_tensors` (e.g. read back from a safetensors file).

        Args:
            style: The style the tensors were saved from.
            names: The target names, in the module's order.
            tensors: ``"<name>::<role>" -> tensor``.

        Returns:
            The module, with trainable copies of the tensors.

        Raises:
            ConfigError: Listing missing and extra keys, or for an unknown style.
        """
        module_cls = _style_class(style)
        expected = [f"{n}{KEY_SEPARATOR}{role}" for role in module_cls.roles for n in names]
        missing = [k for k in expected if k not in tensors]
        extra = [k for k in tensors if k not in set(expected)]
        if missing or extra:
            raise ConfigError(f"{style} module tensors: missing keys {missing}; extra keys {extra}")
        columns = [  # one list per role, aligned with names
            [tensors[f"{n}{KEY_SEPARATOR}{role}"].clone() for n in names]
            for role in module_cls.roles
        ]
        return module_cls(names, *columns)

    def state_tensors(self) -> dict[str, Tensor]:
        """A flat, safetensors-ready dict ``"<name>::<role>" -> tensor`` (contiguous clones)."""
        return {
            f"{name}{KEY_SEPARATOR}{role}": p.detach().contiguous().clone()
            for role, plist in self.tensor_lists().items()
            for name, p in zip(self.names, plist, strict=True)
        }

    def delta(self, theta0: Mapping[str, Tensor]) -> TaskVector:
        """The dense task vector :math:`\\tau`, one :math:`\\Delta W` per target name.

        Differentiable with respect to the module's parameters (``.detach()`` it to freeze).

        Args:
            theta0: Pre-trained weights (used by ``ia3``, whose :math:`\\Delta W` scales
                :math:`W_0`; checked for every style).

        Returns:
            :math:`\\tau` keyed by :attr:`names`.

        Raises:
            ConfigError: If a target is missing from ``theta0`` or a delta has another shape.
        """
        _check_targets(theta0, self.names)
        deltas = {n: self.delta_weight(i, theta0[n]) for i, n in enumerate(self.names)}
        shapes = [n for n, d in deltas.items() if d.shape != theta0[n].shape]
        if shapes:
            raise ConfigError(f"{self.style} module does not fit theta0: shapes differ on {shapes}")
        return TaskVector(deltas)

    def num_trainable(self) -> int:
        """Number of trainable numbers (the "params / task" of a style)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def describe(self) -> str:
        """One line: style, number of targets and of trainable numbers."""
        count = self.num_trainable()
        return f"{self.style} module on {len(self.names)} weights: {count:,} trainable"

    def extra_repr(self) -> str:
        return self.describe()


class FullModule(TaskModule):
    """Full fine-tuning: :math:`\\Delta W = D`, :math:`D` initialised to zeros."""

    style = "full"
    roles = ("delta",)

    def __init__(self, names: Sequence[str], delta: Sequence[Tensor]) -> None:
        super().__init__(names)
        self.delta_w = _parameter_list(self.names, delta, "delta")

    def tensor_lists(self) -> dict[str, nn.ParameterList]:
        return {"delta": self.delta_w}

    def delta_weight(self, i: int, w0: Tensor) -> Tensor:
        return self.delta_w[i]

    @classmethod
    def initial_tensors(
        cls, name: str, w0: Tensor, *, rank: int, generator: torch.Generator | None
    ) -> tuple[Tensor, ...]:
        return (torch.zeros_like(w0),)


class LoRAModule(TaskModule):
    """LoRA as in the paper's code: :math:`\\Delta W = BA`, rank :math:`3r` on ``attn.qkv``.

    :math:`A \\sim U(-b, b)` with :math:`b = 1/\\sqrt{r'\\cdot in}` (kaiming-uniform with
    :math:`a=\\sqrt5` on a ``(1, r', in)`` tensor, √r' smaller than the usual 2-D init),
    :math:`B=0`; no :math:`\\alpha/r` scaling and no dropout.
    """

    style = "lora"
    roles = ("lora_A", "lora_B")

    def __init__(
        self, names: Sequence[str], lora_A: Sequence[Tensor], lora_B: Sequence[Tensor]
    ) -> None:
        super().__init__(names)
        self.lora_A = _parameter_list(self.names, lora_A, "lora_A")  # (r', in) each
        self.lora_B = _parameter_list(self.names, lora_B, "lora_B")  # (out, r') each

    def tensor_lists(self) -> dict[str, nn.ParameterList]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def delta_weight(self, i: int, w0: Tensor) -> Tensor:
        return (self.lora_B[i] @ self.lora_A[i]).view(w0.shape)  # (out, r') @ (r', in) -> (out, in)

    @staticmethod
    def effective_rank(name: str, rank: int) -> int:
        """:math:`r' = 3r` on the fused ``attn.qkv`` weight (r per q, k, v), else :math:`r`."""
        return 3 * rank if name.endswith("attn.qkv.weight") else rank

    @classmethod
    def initial_tensors(
        cls, name: str, w0: Tensor, *, rank: int, generator: torch.Generator | None
    ) -> tuple[Tensor, ...]:
        out_features, in_features = w0.shape[0], w0[0].numel()  # a 1×1 conv: (out, in, 1, 1)
        r = cls.effective_rank(name, rank)
        bound = 1.0 / math.sqrt(r * in_features)
        a = torch.empty(r, in_features, dtype=w0.dtype, device=w0.device)
        return a.uniform_(-bound, bound, generator=generator), w0.new_zeros(out_features, r)


class IA3Module(TaskModule):
    """(IA)³ scaling the output rows, :math:`W = W_0 \\odot \\ell`.

    :math:`\\Delta W = W_0 \\odot (\\ell - 1)`; :math:`\\ell \\in R^{out}` starts at ones, so the
    first delta is zero.
    """

    style = "ia3"
    roles = ("ia3_l",)

    def __init__(self, names: Sequence[str], ia3_l: Sequence[Tensor]) -> None:
        super().__init__(names)
        self.ia3_l = _parameter_list(self.names, ia3_l, "ia3_l")  # (out,) each

    def tensor_lists(self) -> dict[str, nn.ParameterList]:
        return {"ia3_l": self.ia3_l}

    def delta_weight(self, i: int, w0: Tensor) -> Tensor:
        scale = (self.ia3_l[i] - 1).view(-1, *[1] * (w0.ndim - 1))  # (out, 1) or (out, 1, 1, 1)
        return w0 * scale  # scales the output rows (channels)

    @classmethod
    def initial_tensors(
        cls, name: str, w0: Tensor, *, rank: int, generator: torch.Generator | None
    ) -> tuple[Tensor, ...]:
        return (w0.new_ones(w0.shape[0]),)


#: ``style -> TaskModule`` subclass.
STYLES: dict[str, type[TaskModule]] = {c.style: c for c in (FullModule, LoRAModule, IA3Module)}


def _style_class(style: str) -> type[TaskModule]:
    if style not in STYLES:
        raise ConfigError(f"unknown tuning style {style!r}; valid styles: {sorted(STYLES)}")
    return STYLES[style]


def _parameter_list(names: Sequence[str], tensors: Sequence[Tensor], role: str) -> nn.ParameterList:
    """Trainable copies of ``tensors``, one per target name (so that index i is ``names[i]``)."""
    if len(tensors) != len(names):
        raise ConfigError(f"{role}: expected {len(names)} tensors (one per target), "
                          f"got {len(tensors)}")
    return nn.ParameterList([nn.Parameter(t) for t in tensors])


def _is_matrix(w: Tensor) -> bool:
    """2-D, or a 1×1 convolution's ``(out, in, 1, 1)``: a matrix in either case."""
    return w.ndim == 2 or (w.ndim == 4 and w.shape[2:] == (1, 1))


def _check_targets(theta0: Mapping[str, Tensor], names: Sequence[str]) -> None:
    missing = [n for n in names if n not in theta0]
    not_2d = [n for n in names if n in theta0 and not _is_matrix(theta0[n])]
    if missing or not_2d:
        raise ConfigError(
            f"targets must be 2-D weights (or 1×1 convolutions) of theta0; missing {missing}, "
            f"not 2-D {not_2d}"
        )
