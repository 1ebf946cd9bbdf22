r"""K-FAC curvature at :math:`\theta_0`: a Kronecker-factored Fisher per linear weight, through curvlinops.

The diagonal Fisher of :mod:`compolab.fisher` keeps one number per weight. K-FAC (Martens & Grosse,
2015) keeps, per ``nn.Linear`` weight :math:`W` (out × in), a Kronecker product of two small matrices,

.. math::

    F_W \approx A \otimes G, \qquad A = \mathbb E[a a^\top] \ (\text{in} \times \text{in}), \qquad
    G = \mathbb E[g g^\top] \ (\text{out} \times \text{out}),

with :math:`a` the layer's inputs and :math:`g` the gradients of the per-sample loss with respect to
its outputs (labels from the model for ``"type-2"``/``"mc"``, the true ones for ``"empirical"``). It
never forms :math:`F_W` (in²·out² numbers), since

.. math::

    (A \otimes G)\,\mathrm{vec}(\Delta W) = \mathrm{vec}(G\,\Delta W A), \qquad
    \tau^\top F \tau \approx \sum_{\text{layers}} \mathrm{tr}(\Delta W^\top G\, \Delta W A).

**Scale.** :func:`kfac_at` asks curvlinops' ``KFACLinearOperator`` for the K-FAC of the **mean**
cross-entropy over the loader's N samples (``reduction="mean"``), which stores

.. math::

    A = \frac{1}{N T} \sum_{n, t} a_{nt} a_{nt}^\top, \qquad G = \frac{1}{N} \sum_{n, t} g_{nt} g_{nt}^\top

over the T tokens a layer sees (``kfac_approx="expand"``, Eschenhagen et al., 2023). With one token
:math:`A \otimes G \approx \frac1N \sum_n F_n`, the per-sample mean :math:`\bar F`, so that
:meth:`KFAC.quadratic` is on the scale of :meth:`DiagonalFisher.quadratic
<compolab.fisher_store.DiagonalFisher.quadratic>` (which uses ``mean()``); for one sample (or N equal
ones) it is the exact Fisher. Over tokens, the kit's diagonal Fisher sums per-token gradients before
squaring, K-FAC-expand does not: the two then differ by more than the Kronecker approximation.
**Biases** are not covered: only the 2-D weights named (the backbone's tuned weights by default).

**Several tasks.** A sum of Kronecker products is not a Kronecker product, so :class:`KFAC` has no
``+``: keep one per task and add their quadratics (:func:`kfac_penalty`, :func:`iel_kfac_penalty`).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compolab.errors import CompolabError, ConfigError
from compolab.fisher import _Classifier, _columns, _evaluation_point, _split_batch, _tracked_names
from compolab.io import read_safetensors, write_safetensors

__all__ = ["FISHER_TYPES", "KFAC_APPROX", "KIND_TO_FISHER_TYPE", "KFAC", "kfac_at", "kfac_penalty",
           "iel_kfac_penalty"]

#: curvlinops' Fisher types offered here (its ``"forward-only"`` is not a Fisher).
FISHER_TYPES = ("type-2", "mc", "empirical")
#: The kit's Fisher kinds (:data:`compolab.fisher.KINDS`) as curvlinops' types; ``"exact"`` is accepted.
KIND_TO_FISHER_TYPE = {"exact": "type-2", "mc": "mc", "empirical": "empirical"}
#: How a layer that sees several tokens is factored (Eschenhagen et al., 2023).
KFAC_APPROX = ("expand", "reduce")
_FORMAT = "compolab.KFAC/1"


@dataclass(frozen=True, eq=False)
class KFAC:
    """Kronecker factors of the mean Fisher, per linear weight: :math:`\\bar F_W \\approx A \\otimes G`.

    Attributes:
        factors: ``weight name -> (A, G)``, A ``(in, in)`` and G ``(out, out)``, both symmetric PSD.
        num_samples: N, the samples the factors average over.
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"`` (curvlinops' names).
        kfac_approx: ``"expand"`` or ``"reduce"``.

    There is deliberately no ``+``: the K-FAC of two tasks is not the sum of their factors. Keep one
    per task and sum their quadratics (:func:`kfac_penalty`).

    Examples:
        >>> import torch
        >>> k = KFAC({"w": (torch.eye(2), torch.diag(torch.tensor([1.0, 3.0])))}, num_samples=1)
        >>> dw = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # tr(ΔWᵀ G ΔW A) = 1 + 3 * 4
        >>> float(k.quadratic({"w": dw})), k.matvec("w", dw).tolist()
        (13.0, [[1.0, 0.0], [0.0, 6.0]])
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    num_samples: int
    fisher_type: str = "type-2"
    kfac_approx: str = "expand"

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.fisher_type not in FISHER_TYPES:
            raise ConfigError(f"`fisher_type` must be one of {FISHER_TYPES}, got {self.fisher_type!r}")
        if self.kfac_approx not in KFAC_APPROX:
            raise ConfigError(f"`kfac_approx` must be one of {KFAC_APPROX}, got {self.kfac_approx!r}")
        for name, pair in self.factors.items():
            ok = isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(f, Tensor) for f in pair)
            if not ok or any(f.ndim != 2 or f.shape[0] != f.shape[1] for f in pair):
                raise ConfigError(f"the factors of {name!r} must be two square matrices (A, G)")

    def __repr__(self) -> str:
        numel = sum(a.numel() + g.numel() for a, g in self.factors.values())
        return (f"KFAC({len(self.factors)} weights, {numel:,} numbers, {self.num_samples} samples, "
                f"{self.fisher_type}, {self.kfac_approx})")  # fmt: skip

    def _pair(self, name: str, delta_w: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, G)`` of ``name`` on ``delta_w``'s device and dtype, after checking its shape."""
        if name not in self.factors:
            raise ConfigError(f"no K-FAC factors for {name!r}")
        a, g = self.factors[name]
        if tuple(delta_w.shape) != (g.shape[0], a.shape[0]):
            raise ConfigError(f"ΔW of {name!r} has shape {tuple(delta_w.shape)}; its factors need "
                              f"{(g.shape[0], a.shape[0])} (out, in)")  # fmt: skip
        return a.to(delta_w), g.to(delta_w)

    def matvec(self, name: str, delta_w: Tensor) -> Tensor:
        """:math:`(A \\otimes G)\\,\\mathrm{vec}(\\Delta W)` as a matrix: :math:`G\\,\\Delta W A` (out, in).

        Raises:
            ConfigError: If ``name`` has no factors or ``delta_w`` is not ``(out, in)``.
        """
        a, g = self._pair(name, delta_w)
        return g @ delta_w @ a

    def quadratic(self, tau: Mapping[str, Tensor], *, strict: bool = True) -> Tensor:
        """:math:`\\sum_W \\mathrm{tr}(\\Delta W^\\top G\\, \\Delta W A) \\approx \\tau^\\top \\bar F \\tau`.

        Differentiable in ``tau`` (a training penalty); weights with factors but absent from ``tau``
        count as :math:`\\Delta W = 0`.

        Args:
            tau: ``weight name -> ΔW`` (e.g. ``TaskModule.delta(theta0)``).
            strict: If False, weights of ``tau`` without factors are ignored.

        Raises:
            ConfigError: Naming the weights of ``tau`` without factors (when strict), or a bad shape.
        """
        extra = sorted(k for k in tau if k not in self.factors)
        if strict and extra:
            raise ConfigError(f"tau has weights without K-FAC factors: {extra}")
        terms = [(d * self.matvec(k, d)).sum() for k, d in tau.items() if k in self.factors]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def diagonal(self) -> dict[str, Tensor]:
        """The diagonal of :math:`A \\otimes G` per weight, ``(out, in)``: :math:`G_{oo} A_{ii}`."""
        return {k: torch.outer(g.diagonal(), a.diagonal()) for k, (a, g) in self.factors.items()}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the factors of each weight take (:math:`(\\text{in}^2 + \\text{out}^2)` × element size)."""
        return {k: a.numel() * a.element_size() + g.numel() * g.element_size()
                for k, (a, g) in self.factors.items()}  # fmt: skip

    def to(self, *args: Any, **kwargs: Any) -> KFAC:
        """Moved or cast copy (arguments as for ``Tensor.to``)."""
        moved = {k: (a.to(*args, **kwargs), g.to(*args, **kwargs)) for k, (a, g) in self.factors.items()}
        return KFAC(moved, self.num_samples, self.fisher_type, self.kfac_approx)

    def tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(<name>::A / <name>::G tensors, JSON-able rest)``: what :meth:`save` and pool stats write."""
        tensors = {f"{k}::{p}": f for k, (a, g) in self.factors.items() for p, f in (("A", a), ("G", g))}
        meta = {"format": _FORMAT, "num_samples": self.num_samples, "fisher_type": self.fisher_type,
                "kfac_approx": self.kfac_approx, "names": list(self.factors)}  # fmt: skip
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], source: str | Path) -> KFAC:
        """The inverse of :meth:`tensors`; ``source`` (a file) is named in the CompolabError of a bad one."""
        if meta.get("format") != _FORMAT:
            raise CompolabError(f"{source} is not a saved KFAC (format {meta.get('format')!r})")
        names = meta.get("names", [])  # the saved order (safetensors sorts its keys)
        if sorted(f"{n}::{p}" for n in names for p in "AG") != sorted(tensors):
            raise CompolabError(f"{source} does not hold exactly an A and a G for each of its weights "
                                f"{names}")  # fmt: skip
        factors = {n: (tensors[f"{n}::A"], tensors[f"{n}::G"]) for n in names}
        return cls(factors, int(meta["num_samples"]), meta["fisher_type"], meta["kfac_approx"])

    def save(self, path: str | Path) -> None:
        """Write :meth:`tensors` as safetensors, the metadata (JSON) in its header, atomically."""
        tensors, meta = self.tensors()
        write_safetensors(path, tensors, metadata={"compolab": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> KFAC:
        """Read a file written by :meth:`save` (CompolabError: missing, damaged, or not a saved K-FAC)."""
        tensors, meta = read_safetensors(path, what="a K-FAC", device=device)
        return cls.from_tensors(tensors, meta, path)


class _Batches:
    """Re-iterable ``(inputs, columns)`` of a loader, as curvlinops wants them (it loops several times).

    ``"type-2"`` and ``"mc"`` ignore labels (zeros stand in); ``"empirical"`` maps global labels to
    the head's columns as :func:`compolab.fisher.diagonal_fisher` does.
    """

    def __init__(self, loader: Iterable, model: nn.Module, empirical: bool) -> None:
        self.loader, self.model, self.empirical = loader, model, empirical
        self._num_classes: int | None = None

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.loader:
            x, labels = _split_batch(batch)
            if not self.empirical:
                yield x, torch.zeros(x.shape[0], dtype=torch.long)
                continue
            if labels is None:
                raise ConfigError("`fisher_type` 'empirical' needs labels: the loader must yield "
                                  "(inputs, labels)")
            if self._num_classes is None:  # the logit count, for the range check of a plain head
                device = next(self.model.parameters()).device
                with torch.no_grad():
                    self._num_classes = self.model(x[:1].to(device)).shape[-1]
            yield x, _columns(labels, self.model.head, self._num_classes).cpu()


def _linear_weights(model: _Classifier, tracked: Mapping[str, str]) -> list[str]:
    """The module names (inside ``model``) of the tracked weights; each must be an ``nn.Linear`` weight."""
    modules, bad = [], []
    for public, key in tracked.items():
        owner, attr = key.rsplit(".", 1)
        if attr == "weight" and isinstance(model.get_submodule(owner), nn.Linear):
            modules.append(owner)
        else:
            bad.append(public)
    if bad:
        raise ConfigError(f"K-FAC covers nn.Linear weights only (no biases), not: {bad}")
    return modules


def kfac_at(
    backbone: nn.Module,
    head: nn.Module | None,
    loader: Iterable,
    names: Sequence[str] | None = None,
    *,
    fisher_type: str = "mc",
    kfac_approx: str = "expand",
    params: Mapping[str, Tensor] | None = None,
    mc_samples: int = 1,
    seed: int = 0,
) -> KFAC:
    """K-FAC of the mean cross-entropy of ``head(backbone(x))`` over ``loader``, by curvlinops.

    The model is copied (``params`` loaded into the copy, the named weights made trainable, eval
    mode), so ``backbone`` and ``head`` are left as they are.

    Args:
        backbone: Maps inputs to features (or to logits when ``head`` is None).
        head: The classifier (e.g. an ``IncrementalHead``); the softmax runs over all its outputs.
        loader: Yields input batches or ``(inputs, labels)`` pairs; it is iterated more than once.
            Labels only matter for ``"empirical"`` (global labels of an ``IncrementalHead`` are mapped).
        names: ``nn.Linear`` weights of the backbone to cover; default
            :func:`~compolab.models.tuned_weight_names` (none of the head, no biases).
        fisher_type: ``"mc"``, ``"type-2"`` (the true Fisher, the kit's ``"exact"``, which is
            accepted too) or ``"empirical"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers that see several tokens.
        params: Parameters to evaluate at, keyed as for :func:`~compolab.fisher.diagonal_fisher`
            (``head.<name>`` for the head's); missing ones are the modules' own.
        mc_samples: Labels drawn per input for ``"mc"``.
        seed: Seed of curvlinops' label sampler (``"mc"``).

    Returns:
        The factors of every name, keyed by it, with ``num_samples`` N.

    Raises:
        ConfigError: On an unknown type, name or approximation, a name that is not a Linear weight,
            an empty loader, missing labels for ``"empirical"`` or non-finite factors.
    """
    try:
        with warnings.catch_warnings():  # linear_operator calls the deprecated torch.jit.script at import
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            from curvlinops import KFACLinearOperator  # only here: the class itself needs no curvlinops
    except ImportError as e:
        raise CompolabError("K-FAC needs curvlinops-for-pytorch (`pip install curvlinops-for-pytorch`), "
                            f"which this environment lacks ({e})") from None

    kind = KIND_TO_FISHER_TYPE.get(fisher_type, fisher_type)
    if kind not in FISHER_TYPES:
        raise ConfigError(f"`fisher_type` must be one of {FISHER_TYPES} (or 'exact'), got {fisher_type!r}")
    if kfac_approx not in KFAC_APPROX:
        raise ConfigError(f"`kfac_approx` must be one of {KFAC_APPROX}, got {kfac_approx!r}")
    if mc_samples < 1 or (kind != "mc" and mc_samples != 1):
        raise ConfigError(f"`mc_samples` must be >= 1, and 1 unless fisher_type is 'mc'; got {mc_samples}")
    tracked = _tracked_names(backbone, head, names, include_head=False)
    model = copy.deepcopy(_Classifier(backbone, head)).eval().requires_grad_(False)
    with torch.no_grad():
        for key, value in _evaluation_point(model, params).items():
            model.get_parameter(key).copy_(value)
    modules = _linear_weights(model, tracked)
    weights = [model.get_submodule(m).weight.requires_grad_(True) for m in modules]
    batches = _Batches(loader, model, empirical=kind == "empirical")
    if next(iter(batches), None) is None:
        raise ConfigError("the loader yielded no samples")
    operator = KFACLinearOperator(
        model, nn.CrossEntropyLoss(), weights, batches, fisher_type=kind, mc_samples=mc_samples,
        kfac_approx=kfac_approx, seed=seed, check_deterministic=False, num_per_example_loss_terms=1,
    )  # fmt: skip
    operator.compute_kronecker_factors()
    state = operator.state_dict()
    a, g = state["input_covariances"], state["gradient_covariances"]
    factors = {public: (a[m], g[m]) for public, m in zip(tracked, modules, strict=True)}
    bad = [k for k, pair in factors.items() if not all(bool(torch.isfinite(f).all()) for f in pair)]
    if bad:
        raise ConfigError(f"the K-FAC factors of {bad} are not finite")
    return KFAC(factors, int(state["num_data"]), kind, kfac_approx)


def kfac_penalty(
    tau: Mapping[str, Tensor], kfacs: Sequence[KFAC], alpha: float, *, strict: bool = True
) -> Tensor:
    r"""ITA's penalty (Eq. 12) with one K-FAC per task: :math:`\frac{\alpha}{2}\sum_k w_k\,\tau^\top K_k\tau`.

    :func:`~compolab.methods.penalties.ita_penalty` takes :math:`\bar F^{ITA}_t = \sum_{s<t} f_s / N`
    (:meth:`FisherAccumulator.ita <compolab.fisher_store.FisherAccumulator.ita>`), the mean over all
    :math:`N = \sum_k n_k` samples of the previous tasks: each task's mean Fisher weighted by its share
    :math:`w_k = n_k / N` (``1/K`` for tasks of equal size), not summed. With :math:`K_k \approx \bar F_k`
    this is the same scale; the accumulator's prior :math:`\epsilon` is not added (no tasks: 0).

    Args:
        tau: :math:`\tau_t`, ``name -> ΔW``.
        kfacs: One :class:`KFAC` per previous task (at :math:`\theta_0`).
        alpha: :math:`\alpha \ge 0`.
        strict: Passed to :meth:`KFAC.quadratic`.

    Returns:
        The scalar penalty, differentiable in ``tau``; its gradient is
        :math:`\alpha \sum_k w_k G_k \Delta W A_k` per weight.

    Examples:
        >>> import torch
        >>> one = lambda g, n: KFAC({"w": (torch.eye(1), torch.tensor([[g]]))}, num_samples=n)
        >>> tau = {"w": torch.tensor([[2.0]])}
        >>> kfac_penalty(tau, [one(1.0, 1), one(5.0, 3)], alpha=0.5)  # 0.25 * (1 * 4 + 3 * 20) / 4
        tensor(4.)
    """
    if not kfacs:
        return torch.zeros(())
    weights = _weights(kfacs)
    return 0.5 * alpha * sum(w * k.quadratic(tau, strict=strict) for w, k in zip(weights, kfacs, strict=True))


def _weights(kfacs: Sequence[KFAC]) -> list[float]:
    """:math:`w_k = n_k / N`, each task's share of the samples (the accumulator's mean)."""
    total = sum(k.num_samples for k in kfacs)
    if total == 0:
        raise ConfigError("the K-FACs of the penalty hold no samples")
    return [k.num_samples / total for k in kfacs]


def iel_kfac_penalty(
    tau: Mapping[str, Tensor],
    previous: Mapping[str, Tensor],
    kfacs: Sequence[KFAC],
    beta: float,
    t: int,
    *,
    strict: bool = True,
) -> Tensor:
    r"""IEL's penalty (Eq. 18–19) with one K-FAC per task, T = t + 1 (T := 2 at t = 0):

    .. math:: \beta\Big[\tfrac12\big(1-\tfrac1T\big)\sum_k w_k\,\tau_t^\top K_k\tau_t
              - \tfrac1T \sum_k w_k\,\tau_t^\top K_k \sum_{s<t}\tau_s\Big],
              \qquad w_k = \frac{n_k}{\sum_j n_j},

    :func:`~compolab.methods.penalties.iel_penalty` with its running mean :math:`\bar F^{IEL}_t =
    \sum_k w_k \bar F_k` (tasks :math:`k \le t`, the current one included) as :math:`\sum_k w_k K_k`,
    without the accumulator's prior :math:`\epsilon`; the cross term through :meth:`KFAC.matvec`.

    Args:
        tau: :math:`\tau_t`, ``name -> ΔW``.
        previous: :math:`\sum_{s<t}\tau_s` (empty at t = 0: no cross term).
        kfacs: One :class:`KFAC` per task :math:`k \le t` (at :math:`\theta_0`).
        beta: :math:`\beta \ge 0`.
        t: The task index (0-based).
        strict: Passed to :meth:`KFAC.quadratic`; if False, weights without factors are ignored.

    Returns:
        The scalar penalty, differentiable in ``tau``.

    Examples:
        >>> import torch
        >>> k = KFAC({"w": (torch.eye(1), torch.eye(1))}, num_samples=1)
        >>> d, s = {"w": torch.tensor([[2.0]])}, {"w": torch.tensor([[1.0]])}
        >>> iel_kfac_penalty(d, s, [k], beta=1.0, t=1)  # 0.5 * 0.5 * 4 - 0.5 * 2, as iel_penalty
        tensor(0.)
    """
    if not kfacs:
        return torch.zeros(())
    T = 2 if t == 0 else t + 1
    self_term = cross = torch.zeros(())
    for w, k in zip(_weights(kfacs), kfacs, strict=True):
        self_term = self_term + w * k.quadratic(tau, strict=strict)
        shared = [n for n in tau if n in previous and n in k.factors]
        cross = cross + w * sum((tau[n] * k.matvec(n, previous[n])).sum() for n in shared)
    return beta * (0.5 * (1 - 1 / T) * self_term - cross / T)
