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
samples of a ``vmap`` over rows of a VJP, under the MATH attention backend. Exact, but one extra
forward and backward per batch, and slower than the Linear path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from compolab.errors import ConfigError
from compolab.runtime import accumulation_dtype

__all__ = [
    "default_chunk",
    "LinearCapture",
    "capture_linears",
    "linear_squared_grads",
    "generic_squared_grads",
]

#: Largest intermediate tensor materialised in one step, in elements (256 MiB in float32).
MAX_CHUNK_ELEMENTS = 2**26
#: Rows per batched backward on CPU. Larger chunks ran slower on the tiny ViT (1 thread, 50 classes):
#: 0.57 s with 8-10 rows per chunk against 0.76 s with all 50 at once (batch 8), 2.6 s against 3.3 s
#: with 2 rows (batch 32).
CPU_CHUNK_ROWS = 8
#: Cost of one multiply-add of the direct contraction relative to the Gram one: materialising every
#: per-sample gradient is memory-bound. Measured on the tiny ViT (T = 17 tokens, 1 CPU thread): the two
#: break even near R = 8 rows (MC with 5 labels: direct 0.14 s, Gram 0.16 s; 10 labels: 0.22 s, 0.18 s).
DIRECT_COST_FACTOR = 2.0
#: Share of the free GPU memory that one chunk's output gradients may take (the batched backward needs
#: several times that for its own intermediates). Not measured: no GPU was available.
CUDA_MEMORY_SHARE = 0.1
CONTRACTIONS = ("auto", "gram", "direct")


@dataclass
class LinearCapture:
    """What the forward hook of one ``nn.Linear`` saw: inputs and outputs of each call."""

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def tokens_in(self, batch: int) -> Tensor:
        """Inputs of all calls as ``(B, T, I)``; tokens of several calls are concatenated."""
        parts = [_as_tokens(a, batch) for a in self.inputs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def check_untouched(self, name: str) -> None:
        """Raise if a later in-place operation changed a captured input (the Fisher would be wrong)."""
        if [a._version for a in self.inputs] != self.versions:
            raise ConfigError(f"an in-place operation modified the input of {name} after the layer used it; "
                              "its Fisher cannot be computed from hooks")


def default_chunk(captures: dict[str, LinearCapture], device: torch.device) -> int:
    """Rows per batched backward: ``CPU_CHUNK_ROWS`` on CPU, a share of the free memory on a GPU."""
    outputs = [o for c in captures.values() for o in c.outputs]
    per_row = max(1, sum(o.numel() for o in outputs))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * CUDA_MEMORY_SHARE) // (per_row * outputs[0].element_size()))
    return max(1, min(CPU_CHUNK_ROWS, MAX_CHUNK_ELEMENTS // per_row))


def _accumulating(t: Tensor) -> Tensor:
    """``t`` in float32 when it is half precision (autocast), else unchanged."""
    return t.to(accumulation_dtype(t))


def _as_tokens(t: Tensor, batch: int) -> Tensor:
    """``(B, ..., D)`` → ``(B, T, D)``: every dimension between batch and features is a token axis."""
    if t.ndim < 2 or t.shape[0] != batch:
        raise ConfigError(f"a tracked nn.Linear got shape {tuple(t.shape)}; batch ({batch}) must be first")
    return t.reshape(batch, -1, t.shape[-1])


@contextmanager
def capture_linears(modules: dict[str, nn.Linear]) -> Iterator[dict[str, LinearCapture]]:
    """Forward hooks that record the input and output of each named ``nn.Linear`` while active."""
    captures = {name: LinearCapture() for name in modules}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            cap = captures[name]
            cap.inputs.append(args[0].detach())
            cap.versions.append(args[0]._version)
            cap.outputs.append(output)
            # The model continues with a copy, so that an in-place op after the layer (ReLU(inplace=True))
            # leaves the captured output, whose gradient we take, untouched.
            return output.clone()
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield captures
    finally:
        for h in handles:
            h.remove()


def _use_gram(rows: int, tokens: int, out_f: int, in_f: int, batch: int, contraction: str) -> bool:
    if tokens == 1:  # the direct one-token formula is cheapest
        return False
    if contraction != "auto":
        return contraction == "gram"
    fits = batch * tokens * tokens * max(out_f, in_f) <= MAX_CHUNK_ELEMENTS
    # multiply-adds per sample: Gram T²(OI + RO) against direct R·T·OI
    return fits and tokens * (out_f * in_f + rows * out_f) < DIRECT_COST_FACTOR * rows * out_f * in_f


def _gram_kernel(g: Tensor, into: Tensor | None = None) -> Tensor:
    """:math:`K[o, (n, t, s)] = \\sum_r g_{rnto} g_{rnso}` for ``g`` (R, B, T, O) → (O, B·T·T).

    With ``into`` (a previous kernel), accumulates in place and returns it.
    """
    rows, batch, tokens, out_f = g.shape
    gp = g.permute(3, 1, 2, 0).reshape(out_f * batch, tokens, rows)  # (O·B, T, R)
    if into is None:
        return torch.bmm(gp, gp.transpose(1, 2)).view(out_f, -1)
    into.view(out_f * batch, tokens, tokens).baddbmm_(gp, gp.transpose(1, 2))
    return into


def _token_products(a: Tensor) -> Tensor:
    """:math:`a_{nt} \\odot a_{ns}` for ``a`` (B, T, I) → (B·T·T, I)."""
    return (a.unsqueeze(2) * a.unsqueeze(1)).view(-1, a.shape[-1])


def _direct(g: Tensor, a: Tensor) -> Tensor:
    """:math:`\\sum_{r,n} (g_{rn}^\\top a_n)^{\\odot 2}` by materialising every per-sample gradient."""
    rows, batch, tokens, out_f = g.shape
    if tokens == 1:  # (Σ_r g²)ᵀ a², as the official hook does for 2-D inputs
        return g[:, :, 0].square().sum(0).T @ a[:, 0].square()
    step = max(1, MAX_CHUNK_ELEMENTS // (batch * out_f * a.shape[-1]))
    return sum(
        torch.einsum("rbto,bti->rboi", g[r : r + step], a).square().sum((0, 1))
        for r in range(0, rows, step)
    )


def linear_squared_grads(
    logits: Tensor,
    cotangents: Tensor,
    captures: dict[str, LinearCapture],
    wanted: dict[str, tuple[bool, bool]],
    *,
    chunk: int,
    contraction: str = "auto",
) -> dict[str, dict[str, Tensor]]:
    """Squared per-sample gradients of captured Linear layers, summed over rows and samples.

    Args:
        logits: ``(B, C)``, still attached to the graph that produced the captured outputs.
        cotangents: ``(R, B, C)``: the rows :math:`v_{rn}`.
        captures: From :func:`capture_linears`.
        wanted: ``module name -> (weight?, bias?)``.
        chunk: Rows per batched backward.
        contraction: ``"auto"``, ``"gram"`` or ``"direct"`` (same result, different cost).

    Returns:
        ``module name -> {"weight": (O, I), "bias": (O,)}`` (only the wanted entries).
    """
    if contraction not in CONTRACTIONS:
        raise ConfigError(f"contraction must be one of {CONTRACTIONS}, got {contraction!r}")
    batch, rows = logits.shape[0], cotangents.shape[0]
    layers = [n for n in captures if captures[n].outputs]  # a layer never called has zero gradient
    # under bf16 autocast the sums of squares are formed in float32 (accumulation_dtype)
    inputs = {n: _accumulating(captures[n].tokens_in(batch)) for n in layers}
    sizes = {n: (inputs[n].shape[1], captures[n].outputs[0].shape[-1], inputs[n].shape[-1]) for n in layers}
    gram = {n for n in layers if wanted[n][0] and _use_gram(rows, *sizes[n], batch, contraction)}
    # Keep K across row chunks (one final GEMM) unless all kernels together are too large.
    keep_k = sum(o * batch * t * t for n, (t, o, _) in sizes.items() if n in gram) <= MAX_CHUNK_ELEMENTS
    out: dict[str, dict[str, Tensor]] = {n: {} for n in layers}
    kernels: dict[str, Tensor] = {}
    flat = [o for n in layers for o in captures[n].outputs]
    for r in range(0, rows, chunk):
        block = cotangents[r : r + chunk]
        grads = torch.autograd.grad(
            logits, flat, block, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        i = 0
        for name in layers:
            outputs = captures[name].outputs
            parts = [
                (torch.zeros((len(block), *o.shape), dtype=o.dtype, device=o.device) if gr is None else gr)
                .reshape(len(block), batch, -1, o.shape[-1])
                for o, gr in zip(outputs, grads[i : i + len(outputs)], strict=True)
            ]
            i += len(outputs)
            g = _accumulating(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))  # (R, B, T, O)
            want_w, want_b = wanted[name]
            if want_b:
                _add(out[name], "bias", g.sum(2).square().sum((0, 1)))
            if want_w and name in gram and keep_k:
                kernels[name] = _gram_kernel(g, kernels.get(name))
            elif want_w and name in gram:
                _add(out[name], "weight", _gram_kernel(g) @ _token_products(inputs[name]))
            elif want_w:
                _add(out[name], "weight", _direct(g, inputs[name]))
    for name, k in kernels.items():
        out[name]["weight"] = k @ _token_products(inputs[name])
    for name in layers:
        captures[name].check_untouched(name)
    return out


def _add(total: dict[str, Tensor], key: str, value: Tensor) -> None:
    if key in total:
        total[key] += value
    else:
        total[key] = value


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
    # The MATH attention backend is made of ops that vmap batches; fused kernels fall back to a loop.
    with sdpa_kernel(SDPBackend.MATH):
        for b in range(0, inputs.shape[0], step):
            part = vmap(one_sample)(inputs[b : b + step], cotangents[:, b : b + step].transpose(0, 1))
            for k in total:
                total[k] += part[k].sum(0)
    return total
