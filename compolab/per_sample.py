"""Sums of squared per-sample gradients, batched over cotangents: the engine of :mod:`compolab.fisher`.

Every diagonal Fisher of a softmax classifier has the form

.. math::

    F = \\sum_n \\sum_r \\big( \\nabla_\\theta\\, v_{rn}^\\top z(x_n; \\theta) \\big)^{\\odot 2},

with logits :math:`z` and one cotangent :math:`v_{rn} \\in \\mathbb{R}^C` per row :math:`r` and sample
:math:`n` (exact Fisher: :math:`v_{cn} = \\sqrt{p_c}(e_c - p)`, one row per class; MC: sampled labels;
empirical: the true label). This module computes that sum without a Python loop over rows.

**Linear layers** (``nn.Linear`` weights and biases, any number of leading token dimensions): a forward
hook keeps each layer's input :math:`a_n \\in \\mathbb{R}^{T \\times I}` and output; one batched VJP
(``autograd.grad(..., is_grads_batched=True)``) gives :math:`g_{rn} = \\partial (v_{rn}^\\top z) /
\\partial \\text{output} \\in \\mathbb{R}^{T \\times O}` for all rows at once. The per-sample weight gradient
sums over tokens *before* squaring, :math:`G_{rn} = g_{rn}^\\top a_n`, and

.. math::

    \\sum_{r,n} G_{rn}^{\\odot 2} \\;=\\; \\sum_n \\sum_{t,s} K_n[t,s] \\odot (a_{nt} \\odot a_{ns}),
    \\qquad K_n[t,s] = \\sum_r g_{rnt} \\odot g_{rns}

("Gram" contraction: :math:`O(T^2 (O I + R O))` per sample instead of :math:`O(R\\,T\\,O I)` for
materialising every :math:`G_{rn}`; cheaper when :math:`T < R`). Both are exact; ``"auto"`` picks the
cheaper one per layer.

**Any other parameter** (LayerNorm, embeddings, convolutions) goes through ``torch.func``: a ``vmap`` over
samples of a ``vmap`` over rows of a VJP. Exact, but one extra forward and backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from compolab.errors import ConfigError

__all__ = ["LinearCapture", "capture_linears", "linear_squared_grads", "generic_squared_grads"]

#: Largest intermediate tensor materialised in one step, in elements (256 MiB in float32).
MAX_CHUNK_ELEMENTS = 2**26
CONTRACTIONS = ("auto", "gram", "direct")


@dataclass
class LinearCapture:
    """What the forward hook of one ``nn.Linear`` saw: inputs and outputs of each call."""

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[tuple[int, int]] = field(default_factory=list)

    def tokens_in(self, batch: int) -> Tensor:
        """Inputs of all calls as ``(B, T, I)``; tokens of several calls are concatenated."""
        return torch.cat([_as_tokens(a, batch) for a in self.inputs], dim=1)

    def check_untouched(self, name: str) -> None:
        """Raise if a later in-place operation changed a captured tensor (its gradient would be wrong)."""
        now = [(a._version, o._version) for a, o in zip(self.inputs, self.outputs, strict=True)]
        if now != self.versions:
            raise ConfigError(f"an in-place operation modified the input or output of {name}; "
                              "the Fisher of that layer cannot be computed from hooks")


def _as_tokens(t: Tensor, batch: int) -> Tensor:
    """``(B, ..., D)`` → ``(B, T, D)``: every dimension between batch and features is a token axis."""
    if t.ndim < 2 or t.shape[0] != batch:
        raise ConfigError(f"a tracked nn.Linear got shape {tuple(t.shape)}; expected the batch ({batch}) first")
    return t.reshape(batch, -1, t.shape[-1])


@contextmanager
def capture_linears(modules: dict[str, nn.Linear]) -> Iterator[dict[str, LinearCapture]]:
    """Forward hooks that record the input and output of each named ``nn.Linear`` while active."""
    captures = {name: LinearCapture() for name in modules}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            cap = captures[name]
            cap.inputs.append(args[0].detach())
            cap.outputs.append(output)
            cap.versions.append((args[0]._version, output._version))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield captures
    finally:
        for h in handles:
            h.remove()


def _use_gram(rows: int, tokens: int, out_f: int, in_f: int, batch: int, contraction: str) -> bool:
    if contraction != "auto":
        return contraction == "gram"
    fits = batch * tokens * tokens * max(out_f, in_f) <= MAX_CHUNK_ELEMENTS
    # multiply-adds per sample: Gram T²(OI + RO) against direct R·T·OI
    return fits and tokens * tokens * (out_f * in_f + rows * out_f) < rows * tokens * out_f * in_f


def _weight_sq(g: Tensor, a: Tensor, contraction: str) -> Tensor:
    """:math:`\\sum_{r,n} (g_{rn}^\\top a_n)^{\\odot 2}` for ``g`` (R, B, T, O) and ``a`` (B, T, I) → (O, I)."""
    rows, batch, tokens, out_f = g.shape
    in_f = a.shape[-1]
    if tokens == 1:  # one token: (Σ_r g²)ᵀ a², as the official hook does for 2-D inputs
        return g[:, :, 0].square().sum(0).T @ a[:, 0].square()
    if _use_gram(rows, tokens, out_f, in_f, batch, contraction):
        step = max(1, MAX_CHUNK_ELEMENTS // (tokens * tokens * max(out_f, in_f)))
        total = g.new_zeros(out_f, in_f)
        for b in range(0, batch, step):
            gb, ab = g[:, b : b + step], a[b : b + step]
            k = torch.einsum("rbto,rbso->obts", gb, gb).reshape(out_f, -1)  # (O, B·T·T)
            aa = torch.einsum("bti,bsi->btsi", ab, ab).reshape(-1, in_f)  # (B·T·T, I)
            total += k @ aa
        return total
    step = max(1, MAX_CHUNK_ELEMENTS // (batch * out_f * in_f))
    total = g.new_zeros(out_f, in_f)
    for r in range(0, rows, step):
        total += torch.einsum("rbto,bti->rboi", g[r : r + step], a).square().sum((0, 1))
    return total


def linear_squared_grads(
    logits: Tensor,
    cotangents: Tensor,
    captures: dict[str, LinearCapture],
    wanted: dict[str, tuple[bool, bool]],
    *,
    contraction: str = "auto",
) -> dict[str, dict[str, Tensor]]:
    """Squared per-sample gradients of captured Linear layers, summed over rows and samples.

    Args:
        logits: ``(B, C)``, still attached to the graph that produced the captured outputs.
        cotangents: ``(R, B, C)``: the rows :math:`v_{rn}`.
        captures: From :func:`capture_linears` (the graph is retained; call again for more rows).
        wanted: ``module name -> (weight?, bias?)``.
        contraction: ``"auto"``, ``"gram"`` or ``"direct"`` (same result, different cost).

    Returns:
        ``module name -> {"weight": (O, I), "bias": (O,)}`` (only the wanted entries).
    """
    if contraction not in CONTRACTIONS:
        raise ConfigError(f"contraction must be one of {CONTRACTIONS}, got {contraction!r}")
    batch = logits.shape[0]
    names = list(captures)
    flat = [o for n in names for o in captures[n].outputs]
    grads = torch.autograd.grad(
        logits, flat, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    out: dict[str, dict[str, Tensor]] = {}
    i = 0
    for name in names:
        cap = captures[name]
        cap.check_untouched(name)
        parts = []
        for o, gr in zip(cap.outputs, grads[i : i + len(cap.outputs)], strict=True):
            gr = torch.zeros((len(cotangents), *o.shape), dtype=o.dtype, device=o.device) if gr is None else gr
            parts.append(gr.reshape(len(cotangents), batch, -1, o.shape[-1]))
        i += len(cap.outputs)
        g = torch.cat(parts, dim=2)  # (R, B, T, O)
        want_w, want_b = wanted[name]
        out[name] = {}
        if want_w:
            out[name]["weight"] = _weight_sq(g, cap.tokens_in(batch), contraction)
        if want_b:
            out[name]["bias"] = g.sum(2).square().sum((0, 1))
    return out


def generic_squared_grads(
    model: nn.Module,
    params: dict[str, Tensor],
    names: list[str],
    inputs: Tensor,
    cotangents: Tensor,
) -> dict[str, Tensor]:
    """The same sum for arbitrary parameters, by ``vmap`` over samples of per-sample VJPs.

    Args:
        model: Maps a batch of inputs to logits ``(B, C)``.
        params: Every parameter of ``model`` (detached) to evaluate at.
        names: The parameters to differentiate.
        inputs: ``(B, ...)``.
        cotangents: ``(R, B, C)``.

    Returns:
        ``name -> tensor`` of the parameter's shape.
    """
    fixed = {k: v for k, v in params.items() if k not in names}
    chosen = {k: params[k] for k in names}

    def one_sample(x: Tensor, v: Tensor) -> dict[str, Tensor]:
        def logits_of(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, {**fixed, **p}, (x.unsqueeze(0),)).squeeze(0)

        _, pullback = vjp(logits_of, chosen)
        (grads,) = vmap(pullback)(v)  # each (R, *shape)
        return {k: g.square().sum(0) for k, g in grads.items()}

    per_row = cotangents.shape[0] * sum(p.numel() for p in chosen.values())
    step = max(1, MAX_CHUNK_ELEMENTS // max(1, per_row))
    total = {k: torch.zeros_like(p) for k, p in chosen.items()}
    for b in range(0, inputs.shape[0], step):
        part = vmap(one_sample)(inputs[b : b + step], cotangents[:, b : b + step].transpose(0, 1))
        for k in total:
            total[k] += part[k].sum(0)
    return total
