"""The composed model :math:`\\theta_0 + \\sum_t w_t \\tau_t`, for training and for inference.

* :class:`ComposedForward` trains the current task's module *inside* the composed model (IEL's
  forward pass): the earlier task vectors are frozen and **pre-merged once** into one
  dense tensor per target weight, so a step costs one ordinary forward and backward whatever the
  number of frozen modules (the paper's constant cost in T). ITA's individual
  training is the special case with no frozen task vectors.
* :func:`merge` loads the composed weights into an ordinary copy of the backbone: inference
  costs one model whatever :math:`T`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from compolab.errors import ConfigError
from compolab.task_vector import TaskVector, compose
from compolab.tuning import TaskModule

__all__ = ["ComposedForward", "merge"]


class ComposedForward(nn.Module):
    """Functional forward at :math:`\\theta_0 + \\sum_{s} w_s \\tau_s + w\\,\\tau(\\phi)`.

    :math:`\\tau_s` are frozen task vectors (pre-merged into :attr:`merged`) and
    :math:`\\tau(\\phi)` is ``module.delta(theta0)``, the only thing that receives gradients.

    The backbone is frozen (``requires_grad_(False)``) and always kept in eval mode, so its
    normalisation statistics are part of :math:`\\theta_0` and never drift. ``.to()`` and
    ``.double()`` also move :math:`\\theta_0` and the merged tensors.

    Args:
        backbone: The model whose forward is called with the composed parameters.
        theta0: :math:`\\theta_0`: named parameters of ``backbone`` (all of them, or at least the
            targets; the others are taken from ``backbone``).
        taus: Frozen task vectors :math:`\\tau_s` (detached when merged).
        coefs: Their weights :math:`w_s`; default :math:`1/S` each.
        module: The trainable task module, if any.
        coef: Its weight :math:`w` (IEL uses :math:`1/T` for every task, the current one included).

    Raises:
        ConfigError: If a name of ``theta0`` is not in ``backbone``, a task vector or the module
            targets a name not in ``theta0``, or ``coefs`` has the wrong length.

    Attributes:
        merged: ``name -> tensor``, :math:`\\theta_0 + \\sum_s w_s \\tau_s` for every target
            name (one entry per name, whatever the number of frozen task vectors).
    """

    def __init__(
        self,
        backbone: nn.Module,
        theta0: Mapping[str, Tensor],
        taus: Sequence[TaskVector] = (),
        coefs: Sequence[float] | None = None,
        *,
        module: TaskModule | None = None,
        coef: float = 1.0,
    ) -> None:
        super().__init__()
        state = backbone.state_dict()
        unknown = [n for n in theta0 if n not in state]
        if unknown:
            raise ConfigError(f"theta0 names not in the backbone: {unknown}")
        self.backbone = backbone.requires_grad_(False).eval()
        # Plain dicts, not buffers: buffer names cannot contain dots, and theta0 is not state.
        self.theta0: dict[str, Tensor] = {n: t.detach() for n, t in theta0.items()}
        self.module = module
        self.coef = coef
        if module is not None:
            missing = [n for n in module.names if n not in self.theta0]
            if missing:
                raise ConfigError(f"module targets not in theta0: {missing}")
        self.merged: dict[str, Tensor] = {}
        self.set_frozen(taus, coefs)

    @torch.no_grad()
    def set_frozen(self, taus: Sequence[TaskVector], coefs: Sequence[float] | None = None) -> None:
        """Re-merge the frozen pool: :attr:`merged` :math:`= \\theta_0 + \\sum_s w_s \\tau_s`.

        Use it to move to the next task, or to drop (unlearn) a task vector.

        Args:
            taus: The frozen task vectors.
            coefs: Their weights; default :math:`1/S` each.

        Raises:
            ConfigError: If ``coefs`` has the wrong length or a task vector does not fit
                :math:`\\theta_0`.
        """
        full = compose(self.theta0, [tau.detach() for tau in taus], coefs)
        targets = dict.fromkeys(self.module.names if self.module is not None else ())
        targets.update(dict.fromkeys(name for tau in taus for name in tau))
        self.merged = {name: full[name] for name in targets}

    def params(self) -> dict[str, Tensor]:
        """The composed parameters, ready for :func:`torch.func.functional_call`.

        Returns:
            ``theta0`` with every target replaced by ``merged[name] + coef * delta[name]``.
        """
        params = dict(self.theta0)
        params.update(self.merged)
        if self.module is not None:
            delta = self.module.delta(self.theta0)
            for name in self.module.names:
                params[name] = self.merged[name] + self.coef * delta[name]
        return params

    def forward(self, x: Tensor) -> Tensor:
        """``backbone(x)`` at the composed parameters :meth:`params`."""
        return functional_call(self.backbone, self.params(), (x,))

    def train(self, mode: bool = True) -> ComposedForward:
        """Set the training mode of the module; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ComposedForward:
        # nn.Module.to / .double / .cuda all go through _apply: move the plain dicts as well.
        super()._apply(fn, recurse)
        self.theta0 = {n: fn(t) for n, t in self.theta0.items()}
        self.merged = {n: fn(t) for n, t in self.merged.items()}
        return self


@torch.no_grad()
def merge(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    taus: Sequence[TaskVector],
    coefs: Sequence[float] | None = None,
) -> nn.Module:
    """An ordinary copy of ``backbone`` at :math:`\\theta_0 + \\sum_t w_t \\tau_t`.

    Args:
        backbone: The model to copy (not modified).
        theta0: :math:`\\theta_0` (named parameters of ``backbone``).
        taus: Task vectors :math:`\\tau_t` (e.g. ``module.delta(theta0).detach()``).
        coefs: Weights :math:`w_t`; default :math:`1/T` each.

    Returns:
        The merged model (a deep copy): one forward whatever :math:`T`.

    Raises:
        ConfigError: If ``coefs`` has the wrong length, or a name is not in ``theta0`` or the
            backbone.
    """
    params = compose(theta0, [tau.detach() for tau in taus], coefs)
    model = copy.deepcopy(backbone)
    _, unexpected = model.load_state_dict(params, strict=False)
    if unexpected:
        raise ConfigError(f"names not in the backbone: {unexpected}")
    return model
