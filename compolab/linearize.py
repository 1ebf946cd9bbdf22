r"""The linearised ("tangent") model of TMC: a first-order Taylor expansion at θ0.

.. math:: f_{lin}(x;\theta_0+\tau) = f(x;\theta_0) + J_\theta f(x;\theta_0)\,\tau

One :func:`torch.func.jvp` through :func:`torch.func.functional_call` gives both terms for **any**
model, keyed by the model's own parameter names, so τ is an ordinary
:class:`~compolab.task_vector.TaskVector` (no hand-linearised layer copies, unlike the official code).
Fused attention kernels have no forward-mode AD, so the jvp runs inside
:func:`~compolab.curvature.math_attention`; the model's own forward stays fused outside it.

A classification head on top is linearised with the backbone (TMC linearises the whole network):
with a frozen base head :math:`(W_0, b_0)` and its tangent :math:`(\Delta W, \Delta b)`,

.. math:: W_0\,(f_0 + J\tau) + \Delta W f_0 + b_0 + \Delta b, \qquad f_0 = f(x;\theta_0).

The model is linear in the tangent, so the composition of components (:func:`compose_linearized`)
is exactly (up to rounding) the average of their outputs, at the cost of one linearised forward,
and dropping a component (unlearning) leaves no residual.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, linearize

from compolab.errors import ConfigError
from compolab.models import math_attention, theta0_of, tuned_weight_names
from compolab.task_vector import TaskVector, uniform_coefs
from compolab.tuning import TaskModule

__all__ = [
    "LinearizedModel",
    "TangentComponent",
    "linearized_forward",
    "linearize_at",
    "compose_linearized",
    "linearized_names",
]


def linearized_names(model: nn.Module, names: Sequence[str] | str | None = None) -> list[str]:
    """The parameters a linearised model expands in.

    Args:
        model: The model.
        names: ``None`` or ``"tuned"``: the tuned weights (:func:`~compolab.models.tuned_weight_names`);
            ``"all"``: every floating-point parameter; or an explicit list.

    Returns:
        The names, in the model's order for ``"tuned"``/``"all"``.

    Raises:
        ConfigError: For an unknown keyword or a name that is not a parameter of ``model``.
    """
    params = dict(model.named_parameters())
    if names is None or names == "tuned":
        return tuned_weight_names(model)
    if names == "all":
        return [n for n, p in params.items() if p.is_floating_point()]
    if isinstance(names, str):
        raise ConfigError(f"names must be 'tuned', 'all' or a list of parameter names, got {names!r}")
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"names not among the model's parameters: {missing}")
    return list(names)


def _head_params(head: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in head.named_parameters()}


def linearized_forward(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    x: Tensor,
    *,
    head: nn.Module | None = None,
    head_delta: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The two Taylor terms :math:`(f(x;\theta_0),\ J_\theta f(x;\theta_0)\,\tau)` by one jvp.

    Parameters not in ``tau`` are the backbone's own (constants). Gradients flow to ``tau`` and
    ``head_delta`` (backpropagation through the jvp), never to θ0.

    Args:
        backbone: Any model; called in its current mode (keep it in eval mode: frozen statistics).
        theta0: :math:`\theta_0`, at least every name of ``tau``.
        tau: The tangent :math:`\tau` (name → tensor, shapes of θ0).
        x: A batch.
        head: An optional head on top of ``backbone``, linearised with it at its own parameters.
        head_delta: The head's tangent (its parameter names → tensors); default zeros.

    Returns:
        ``(f0, jvp)``: the output at θ0 and its directional derivative; the linearised output is
        their sum.

    Raises:
        ConfigError: If a name of ``tau`` is not in ``theta0`` or ``head_delta`` does not match the
            head's parameters.
    """
    missing = [n for n in tau if n not in theta0]
    if missing:
        raise ConfigError(f"tau names not in theta0: {missing}")
    primal = {n: theta0[n] for n in tau}
    head_primal = _head_params(head) if head is not None else {}
    if head_delta is None:
        head_delta = {n: torch.zeros_like(p) for n, p in head_primal.items()}
    if set(head_delta) != set(head_primal):
        expected = sorted(head_primal)
        raise ConfigError(f"head_delta keys {sorted(head_delta)} differ from the head's {expected}")

    def f(params: dict[str, Tensor], head_params: dict[str, Tensor]) -> Tensor:
        features = functional_call(backbone, params, (x,))
        return features if head is None else functional_call(head, head_params, (features,))

    with math_attention(backbone):  # forward-mode AD needs the MATH attention kernel
        # the tangents' pytree must match the primals', key order included
        tangent = ({n: tau[n] for n in primal}, {n: head_delta[n] for n in head_primal})
        return jvp(f, (primal, head_primal), tangent)


def linearize_at(
    backbone: nn.Module,
    theta0: Mapping[str, Tensor],
    names: Sequence[str],
    x: Tensor,
    *,
    head: nn.Module | None = None,
) -> tuple[Tensor, Callable[..., Tensor]]:
    r"""Trace :math:`\tau \mapsto J\tau` once on a fixed batch (:func:`torch.func.linearize`).

    Evaluating many compositions on the same batch (a sweep over coefficients, unlearning each
    component in turn) then costs one traced jvp each, without recomputing :math:`f_0`.

    Args:
        backbone: The model (eval mode).
        theta0: :math:`\theta_0` (at least ``names``).
        names: The linearised parameters.
        x: The fixed batch.
        head: An optional linearised head (as :func:`linearized_forward`).

    Returns:
        ``(f0, jvp_fn)``; ``jvp_fn(tau)`` or, with a head, ``jvp_fn(tau, head_delta)`` returns
        :math:`J\tau` (+ the head's terms), equal to :func:`linearized_forward`'s second output.
    """
    primal = {n: theta0[n].detach() for n in names}
    head_primal = _head_params(head) if head is not None else {}

    def f(params: dict[str, Tensor], head_params: dict[str, Tensor]) -> Tensor:
        features = functional_call(backbone, params, (x,))
        return features if head is None else functional_call(head, head_params, (features,))

    with math_attention(backbone), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")  # torch.fx noise
        f0, traced = linearize(f, primal, head_primal)

    def jvp_fn(tau: Mapping[str, Tensor], head_delta: Mapping[str, Tensor] | None = None) -> Tensor:
        if head_delta is None:
            head_delta = {n: torch.zeros_like(p) for n, p in head_primal.items()}
        return traced({n: tau[n] for n in names}, {n: head_delta[n] for n in head_primal})

    return f0, jvp_fn


@dataclass(frozen=True)
class TangentComponent:
    """One trained TMC component: the backbone's tangent τ and, with a head, the head's tangent.

    Attributes:
        tau: :math:`\\tau` keyed by the backbone's parameter names.
        head: :math:`(\\Delta W, \\Delta b)` as ``{"weight", "bias"}`` (None without a head).
    """

    tau: TaskVector
    head: TaskVector | None = None


class LinearizedModel(nn.Module):
    r"""A model linearised at θ0: :math:`f(x;\theta_0) + J_\theta f(x;\theta_0)\,\tau`.

    The tangent :math:`\tau` is either ``module.delta(theta0)`` of a
    :class:`~compolab.tuning.TaskModule` (any style; it lives in the module's parameters) or a dense
    τ held here (``tau``, or zeros over ``names``). With a base ``head`` (frozen), a trainable head
    tangent :attr:`head_delta` (zeros) is added and the output is the linearised logits.

    The backbone is frozen and always kept in eval mode (BatchNorm statistics are part of θ0, so the
    model is truly linear in τ). ``.to()`` / ``.double()`` also move :math:`\theta_0`.

    Args:
        backbone: Any model (e.g. a timm ViT returning features).
        theta0: :math:`\theta_0`, at least the linearised names; default: the backbone's current
            parameters.
        module: A task module giving the tangent (its parameters are the trainable ones).
        tau: A dense tangent to start from (copied into parameters); ignored with ``module``.
        names: Linearised parameters without ``module`` and ``tau``: ``"tuned"`` (default),
            ``"all"`` or a list (:func:`linearized_names`).
        head: A frozen base head on top of the backbone (e.g. ``nn.Linear(D, C)``).
        head_delta: The head tangent to start from; default zeros.

    Raises:
        ConfigError: If both ``module`` and ``tau`` are given, a name is unknown, or a shape differs.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
        >>> lin = LinearizedModel(net, names=["0.weight"])
        >>> x = torch.randn(3, 2)
        >>> torch.allclose(lin(x), net(x))  # tau = 0: the base model
        True
        >>> list(lin.task_vector())
        ['0.weight']
    """

    def __init__(
        self,
        backbone: nn.Module,
        theta0: Mapping[str, Tensor] | None = None,
        *,
        module: TaskModule | None = None,
        tau: Mapping[str, Tensor] | None = None,
        names: Sequence[str] | str | None = None,
        head: nn.Module | None = None,
        head_delta: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        if module is not None and tau is not None:
            raise ConfigError("give the tangent either as a module or as a dense tau, not both")
        if module is not None:
            names = list(module.names)
        elif tau is not None:
            names = list(tau)
        names = linearized_names(backbone, names)
        self.backbone = backbone.requires_grad_(False).eval()
        if theta0 is None:
            theta0 = theta0_of(backbone, names)
        missing = [n for n in names if n not in theta0]
        if missing:
            raise ConfigError(f"linearised names not in theta0: {missing}")
        self.names: tuple[str, ...] = tuple(names)
        # A plain dict, not buffers: buffer names cannot contain dots, and theta0 is not state.
        self.theta0: dict[str, Tensor] = {n: theta0[n].detach() for n in names}
        self.module = module
        self.tau = None
        if module is None:
            start = tau if tau is not None else {n: torch.zeros_like(t) for n, t in self.theta0.items()}
            bad = [n for n in names if start[n].shape != self.theta0[n].shape]
            if bad:
                raise ConfigError(f"tau shapes differ from theta0 on {bad}")
            self.tau = nn.ParameterList([nn.Parameter(start[n].detach().clone()) for n in names])
        self.head = head.requires_grad_(False) if head is not None else None
        self.head_delta = None
        if head is not None:
            params = _head_params(head)
            if head_delta is None:
                head_delta = {n: torch.zeros_like(p) for n, p in params.items()}
            shapes = {n: p.shape for n, p in params.items()}
            if {n: t.shape for n, t in head_delta.items()} != shapes:
                raise ConfigError(f"head_delta must match the head's parameters {shapes}")
            head_params = {n: nn.Parameter(t.detach().clone()) for n, t in head_delta.items()}
            self.head_delta = nn.ParameterDict(head_params)

    def tangent(self) -> TaskVector:
        """The current tangent τ, differentiable w.r.t. the trainable parameters."""
        if self.module is not None:
            return self.module.delta(self.theta0)
        return TaskVector(dict(zip(self.names, self.tau, strict=True)))

    def task_vector(self) -> TaskVector:
        """τ, detached: an ordinary task vector keyed by the backbone's parameter names."""
        return self.tangent().detach()

    def component(self) -> TangentComponent:
        """The trained component (τ and the head tangent), detached, for :func:`compose_linearized`."""
        head = None
        if self.head_delta is not None:
            head = TaskVector({n: p.detach() for n, p in self.head_delta.items()})
        return TangentComponent(self.task_vector(), head)

    def taylor_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(f0, jvp)``: :math:`f(x;\theta_0)` and :math:`J\tau` (+ the head's terms)."""
        head_delta = dict(self.head_delta.items()) if self.head_delta is not None else None
        return linearized_forward(self.backbone, self.theta0, self.tangent(), x,
                                  head=self.head, head_delta=head_delta)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        r""":math:`f(x;\theta_0) + J\tau`: one primal + tangent pass (about 2–3 plain forwards)."""
        f0, df = self.taylor_terms(x)
        return f0 + df

    def train(self, mode: bool = True) -> LinearizedModel:
        """Set the training mode of the tangent; the frozen backbone and head stay in eval mode."""
        super().train(mode)
        self.backbone.eval()
        if self.head is not None:
            self.head.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LinearizedModel:
        # nn.Module.to / .double / .cuda all go through _apply: move the plain dict as well.
        super()._apply(fn, recurse)
        self.theta0 = {n: fn(t) for n, t in self.theta0.items()}
        return self


def compose_linearized(
    backbone: nn.Module,
    components: Mapping[int, TangentComponent] | Sequence[TangentComponent],
    coefs: Sequence[float] | None = None,
    *,
    drop: Sequence[int] = (),
    theta0: Mapping[str, Tensor] | None = None,
    head: nn.Module | None = None,
) -> LinearizedModel:
    r"""TMC's composition: the linearised model at :math:`\tau = \sum_i w_i \tau_i`.

    Because the model is linear in τ, its output is exactly :math:`\sum_i w_i f_{lin}(x;
    \theta_0+\tau_i)` (when :math:`\sum_i w_i = 1`): the output ensemble of the components at the
    cost of **one** linearised forward whatever their number. Unlearning component k is composing
    without it (``drop=[k]``): nothing of it remains.

    Args:
        backbone: The model at θ0.
        components: The components (by id, or a list: ids 0..n-1).
        coefs: Weights :math:`w_i` of the kept components, in id order; default uniform.
        drop: Ids to leave out (unlearning).
        theta0: :math:`\theta_0`; default: the backbone's parameters.
        head: The shared base head, if the components were trained with one.

    Returns:
        A frozen :class:`LinearizedModel` in eval mode.

    Raises:
        ConfigError: Unknown dropped ids, nothing left, wrong number of coefs, components with
            different names, or head tangents without a head.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> one = TangentComponent(TaskVector({"bias": torch.tensor([2.0])}))
        >>> two = TangentComponent(TaskVector({"bias": torch.tensor([4.0])}))
        >>> x = torch.zeros(1, 2)
        >>> round(float(compose_linearized(net, [one, two])(x) - net(x)), 4)  # (2 + 4) / 2
        3.0
        >>> round(float(compose_linearized(net, [one, two], drop=[1])(x) - net(x)), 4)
        2.0
    """
    comps = dict(components) if isinstance(components, Mapping) else dict(enumerate(components))
    unknown = sorted(set(drop) - set(comps))
    if unknown:
        raise ConfigError(f"cannot drop unknown component(s) {unknown}; ids are {sorted(comps)}")
    kept = [k for k in sorted(comps) if k not in set(drop)]
    if not kept:
        raise ConfigError("nothing left to compose: every component is dropped")
    coefs = uniform_coefs(len(kept)) if coefs is None else list(coefs)
    if len(coefs) != len(kept):
        raise ConfigError(f"got {len(coefs)} coefs for {len(kept)} kept components {kept}")
    tau = sum(c * comps[k].tau for c, k in zip(coefs, kept, strict=True))
    heads = [comps[k].head for k in kept]
    head_delta = None
    if any(h is not None for h in heads):
        if head is None or any(h is None for h in heads):
            raise ConfigError("head tangents need a base head, and every component must have one")
        head_delta = sum(c * h for c, h in zip(coefs, heads, strict=True))
    model = LinearizedModel(backbone, theta0, tau=tau, head=head, head_delta=head_delta)
    return model.requires_grad_(False).eval()
