"""The diagonal Fisher information at :math:`\\theta_0`: the curvature behind ITA and IEL.

The paper replaces the Hessian of the loss by the diagonal of the **true** Fisher of the classifier,

.. math::

    F = \\sum_n \\sum_{c} p_c(x_n) \\big(\\nabla_\\theta \\log p_c(x_n)\\big)^{\\odot 2},

an expectation over the model's own predictive distribution (softmax over *all* classes of the
head), with per-sample gradients that sum over tokens before squaring. For softmax
cross-entropy this is also the diagonal of the generalised Gauss–Newton matrix.

:func:`diagonal_fisher` computes it exactly with one batched backward over the classes instead of
the official code's Python loop of one backward per class (see :mod:`compolab.per_sample`), and
also offers the official top-k-classes speed knob, the Monte-Carlo Fisher and the empirical Fisher.
:class:`FisherAccumulator` turns per-task Fishers into the normalised matrices used by ITA and IEL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from compolab.errors import ConfigError
from compolab.fisher_store import PAPER_FISHER_FLOOR, DiagonalFisher, FisherAccumulator
from compolab.models import tuned_weight_names
from compolab.per_sample import (
    CONTRACTIONS,
    capture_linears,
    default_chunk,
    generic_squared_grads,
    linear_squared_grads,
)
from compolab.runtime import accumulation_dtype

__all__ = ["PAPER_FISHER_FLOOR", "KINDS", "DiagonalFisher", "FisherAccumulator", "diagonal_fisher"]

KINDS = ("exact", "mc", "empirical")


class _Classifier(nn.Module):
    """``head(backbone(x))`` (or ``backbone(x)`` alone), so that one ``functional_call`` sees both."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _tracked_names(
    backbone: nn.Module, head: nn.Module | None, names: Sequence[str] | None, include_head: bool
) -> dict[str, str]:
    """``public name -> name inside _Classifier`` for every parameter whose Fisher is wanted."""
    own = dict(backbone.named_parameters())
    if names is None:
        names = tuned_weight_names(backbone) or [
            f"{m}.weight" for m, mod in backbone.named_modules() if isinstance(mod, nn.Linear)
        ]
    unknown = [n for n in names if n not in own]
    if unknown:
        raise ConfigError(f"names not among the backbone's parameters: {unknown}")
    tracked = {n: f"backbone.{n}" for n in names}
    if include_head:
        if head is None:
            raise ConfigError("include_head=True needs a head")
        for n, _ in head.named_parameters():
            if f"head.{n}" in tracked:
                raise ConfigError(f"backbone parameter 'head.{n}' clashes with the head's own name")
            tracked[f"head.{n}"] = f"head.{n}"
    if not tracked:
        raise ConfigError("no parameters to compute the Fisher of: pass names=[...] or include_head=True")
    return tracked


def _cotangents(
    logits: Tensor, labels: Tensor | None, kind: str, mc_samples: int, top_k: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Rows :math:`v_{rn}` ``(R, B, C)`` whose squared VJPs sum to the requested Fisher."""
    p = logits.detach().softmax(-1)  # (B, C)
    n_cls = p.shape[1]
    eye = torch.eye(n_cls, dtype=p.dtype, device=p.device)
    if kind == "exact":  # d(sqrt(p_c) log p_c)/dz = sqrt(p_c) (e_c - p), one row per class
        classes = torch.arange(n_cls, device=p.device)
        if top_k is not None and top_k < n_cls:  # official speed knob: biased low
            counts = torch.bincount(p.topk(top_k, dim=1).indices.flatten(), minlength=n_cls)
            classes = torch.argsort(-counts, stable=True)[:top_k]
        return p[:, classes].T.sqrt().unsqueeze(-1) * (eye[classes].unsqueeze(1) - p)
    if kind == "mc":  # k labels y ~ p per input, each row (e_y - p) / sqrt(k)
        y = torch.multinomial(p.cpu(), mc_samples, replacement=True, generator=generator).to(p.device)
        return (eye[y.T] - p) / mc_samples**0.5  # (k, B, C)
    if labels is None:
        raise ConfigError("kind='empirical' needs labels: the loader must yield (inputs, labels)")
    return (eye[labels] - p).unsqueeze(0)


def _columns(labels: Tensor, head: nn.Module | None, n_cls: int) -> Tensor:
    """Global labels → logit columns (an ``IncrementalHead`` maps them; otherwise they are columns)."""
    labels = labels.long()
    if head is not None and hasattr(head, "global_labels"):
        order = head.global_labels.to(labels.device)
        match = labels.unsqueeze(1) == order.unsqueeze(0)  # (B, C)
        if not bool(match.any(1).all()):
            unknown = sorted(set(labels[~match.any(1)].tolist()))
            raise ConfigError(f"labels {unknown} are not classes of the head")
        return match.float().argmax(1)
    if labels.min() < 0 or labels.max() >= n_cls:
        raise ConfigError(f"labels must lie in [0, {n_cls}) (the logit columns)")
    return labels


def _evaluation_point(model: _Classifier, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Every parameter of ``model`` (detached), replaced by ``params`` where given."""
    base = {n: p.detach() for n, p in model.named_parameters()}
    for public, value in (params or {}).items():
        key = public if public.startswith("head.") else f"backbone.{public}"
        if key not in base:
            raise ConfigError(f"params has a name that is not a parameter of the model: {public!r}")
        base[key] = value.detach()
    return base


def _split_by_path(
    model: nn.Module, keys: list[str]
) -> tuple[dict[str, nn.Linear], dict[str, tuple[bool, bool]], list[str]]:
    """Linear weights and biases (fast path: module, which of the two) and the other parameters."""
    linears: dict[str, nn.Linear] = {}
    wanted: dict[str, tuple[bool, bool]] = {}
    generic: list[str] = []
    for key in keys:
        owner, attr = key.rsplit(".", 1)
        module = model.get_submodule(owner)
        if isinstance(module, nn.Linear) and attr in ("weight", "bias"):
            linears[owner] = module
            w, b = wanted.get(owner, (False, False))
            wanted[owner] = (w or attr == "weight", b or attr == "bias")
        else:
            generic.append(key)
    return linears, wanted, generic


def _accumulate(total: dict[str, Tensor], key: str, value: Tensor) -> None:
    total[key] = total[key] + value if key in total else value


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise ConfigError("the loader must yield tensors or (inputs, labels) pairs")


def diagonal_fisher(
    backbone: nn.Module,
    head: nn.Module | None,
    loader: Iterable,
    *,
    names: Sequence[str] | None = None,
    include_head: bool = False,
    kind: str = "exact",
    mc_samples: int = 1,
    top_k: int | None = None,
    class_chunk: int | None = None,
    params: Mapping[str, Tensor] | None = None,
    contraction: str = "auto",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> DiagonalFisher:
    """Diagonal Fisher of ``head(backbone(x))`` summed over the samples of ``loader``.

    With :math:`p = \\mathrm{softmax}(z)` over all classes of the head:

    * ``"exact"`` (the paper's): :math:`\\sum_n \\sum_c p_c \\, (\\nabla \\log p_c)^{\\odot 2}`; with
      ``top_k`` only the ``top_k`` classes that are most often among the top-``top_k`` of the batch's
      samples (ties → lower column), as ``--fisher_mc_classes`` does — biased low, a speed knob only;
    * ``"mc"``: :math:`\\sum_n \\frac{1}{k} \\sum_{j \\le k} (\\nabla \\log p_{y_j})^{\\odot 2}` with
      :math:`y_j \\sim p` (``k = mc_samples``), unbiased;
    * ``"empirical"``: :math:`\\sum_n (\\nabla \\log p_{y_n})^{\\odot 2}` at the true labels.

    Args:
        backbone: Maps inputs to features (or to logits when ``head`` is None).
        head: The classifier (e.g. an ``IncrementalHead``); its outputs are the classes of the softmax.
        loader: Yields input batches or ``(inputs, labels)`` pairs; labels only matter for ``"empirical"``
            (global labels of an ``IncrementalHead`` are mapped to its columns).
        names: Backbone parameters to track; default :func:`~compolab.models.tuned_weight_names`
            (or every ``nn.Linear`` weight if the backbone has no ViT blocks).
        include_head: Also track the head's parameters, keyed ``head.<name>``.
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Labels drawn per input for ``"mc"``.
        top_k: For ``"exact"`` only: restrict each batch to ``top_k`` classes.
        class_chunk: Rows (classes) per batched backward; default
            :func:`~compolab.per_sample.default_chunk` (a memory budget for the output gradients).
        params: Parameters to evaluate at, keyed like the result (e.g. :math:`\\theta_0 + \\tau`);
            missing ones are the modules' own. Always detached.
        contraction: How Linear weights are contracted, ``"auto"``, ``"gram"`` or ``"direct"``
            (:mod:`compolab.per_sample`); all exact.
        generator: Random generator for ``"mc"``.
        progress: Show a progress bar.

    Returns:
        The Fisher summed over samples, with ``num_samples``; use ``.mean()`` for the per-sample mean.

    Raises:
        ConfigError: On an unknown kind or name, an empty loader, labels missing for ``"empirical"``
            or non-finite logits.

    Note:
        ``nn.Linear`` weights and biases take the fast path; other parameters are differentiated per
        sample with ``torch.func.vmap``, which needs layers that do not mix samples (BatchNorm in eval
        mode) and is slower.

    Examples:
        A linear softmax classifier has :math:`F_{oi} = p_o (1 - p_o) x_i^2` per sample:

        >>> import torch
        >>> from torch import nn
        >>> head = nn.Linear(2, 2)
        >>> _ = nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)  # p = (1/2, 1/2)
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> diagonal_fisher(nn.Identity(), head, [x], names=[], include_head=True)["head.weight"]
        tensor([[0.2500, 1.0000],
                [0.2500, 1.0000]])
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if contraction not in CONTRACTIONS:
        raise ConfigError(f"contraction must be one of {CONTRACTIONS}, got {contraction!r}")
    if mc_samples < 1 or (top_k is not None and top_k < 1) or (class_chunk is not None and class_chunk < 1):
        raise ConfigError("mc_samples, top_k and class_chunk must be >= 1")
    if top_k is not None and kind != "exact":
        raise ConfigError("top_k only applies to kind='exact'")
    tracked = _tracked_names(backbone, head, names, include_head)
    model = _Classifier(backbone, head)
    base = _evaluation_point(model, params)
    linears, wanted, generic = _split_by_path(model, list(tracked.values()))

    total: dict[str, Tensor] = {}
    num_samples = 0
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=f"Fisher ({kind})")
    device = next(iter(base.values())).device
    for batch in batches:
        x, labels = _split_batch(batch)
        x = x.to(device)
        with torch.enable_grad():
            # tracked Linear weights require grad, so that their layers' outputs join the graph
            call = {k: v.detach().requires_grad_(k.rsplit(".", 1)[0] in linears) for k, v in base.items()}
            with capture_linears(linears) as captures:
                logits = functional_call(model, call, (x,))
            if logits.ndim != 2:
                raise ConfigError(f"the model must return logits (B, C); got shape {tuple(logits.shape)}")
            if not bool(torch.isfinite(logits).all()):
                raise ConfigError("the model returned non-finite logits (NaN or inf): no Fisher")
            use_labels = kind == "empirical" and labels is not None
            cols = _columns(labels.to(device), head, logits.shape[1]) if use_labels else None
            # p in float32 even under autocast; the rows take the logits' dtype for the backward
            wide = logits.to(accumulation_dtype(logits))
            rows = _cotangents(wide, cols, kind, mc_samples, top_k, generator).to(logits.dtype)
            chunk = class_chunk or default_chunk(captures, device)
            if linears:
                with torch.autocast(device.type, enabled=False):  # float32 contractions under bf16 autocast
                    parts = linear_squared_grads(
                        logits, rows, captures, wanted, chunk=chunk, contraction=contraction
                    )
                for owner, entries in parts.items():
                    for attr, value in entries.items():
                        _accumulate(total, f"{owner}.{attr}", value)
            del logits, captures
            if generic:
                for key, value in generic_squared_grads(model, base, generic, x, rows).items():
                    _accumulate(total, key, value)
        num_samples += x.shape[0]
    if num_samples == 0:
        raise ConfigError("the loader yielded no samples")
    values = {public: total.get(key, torch.zeros_like(base[key])) for public, key in tracked.items()}
    bad = [k for k, v in values.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"the Fisher of {bad} is not finite")
    return DiagonalFisher(values, num_samples)
