r"""The explorer's engine: a pool, a small fixed evaluation set and caches that make an edit cheap.

An *edit* (:class:`Edit`) is one point of the editing family of :mod:`compolab.editing`,
:math:`\theta_0 + \sum_t c_t \tau_t` with :math:`c_t = w_t` (keep), 0 (drop) or :math:`-w_t`
(negate), plus which heads give the output classes. :meth:`Explorer.evaluate` returns a
:class:`View`: per-task accuracy, the measured multi-task loss next to the second-order prediction
(Eq. 2, :class:`~compolab.explore.quadratic.Quadratic`) and the composed model's coordinates on the
plane of two modules. Three caches keep it live:

* the **stem** — everything before the first transformer block (the tiny ViT's conv stem, the
  position embedding) — is computed once: no module touches it;
* the **logits** of each composition are kept, so a change of the output heads alone (a
  "head-only" edit) is an argmax over cached logits;
* the **quadratic model** and the **Gram matrix** of the modules are computed once: the prediction
  and the plane coordinates cost :math:`O(T^2)`.

The plane and the 1-D curves reuse :mod:`compolab.probes` on the cached stem outputs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from math import nan

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from compolab.errors import ConfigError
from compolab.explore.edit import Edit, View
from compolab.explore.quadratic import Quadratic
from compolab.explore.stem import split_stem
from compolab.heads import IncrementalHead
from compolab.probes import Interpolation, Plane, ProbeData, default_lambdas, interpolate, plane
from compolab.probes.curvatures import Curvature, probe_curvature
from compolab.probes.engine import check_directions
from compolab.task_vector import TaskVector

__all__ = ["Explorer"]


class Explorer:
    r"""Edits of a pool θ0 + Σ c_t τ_t, evaluated on fixed images with the pool's heads.

    Args:
        backbone: θ0's model (images → features).
        theta0: θ0's tuned weights (the modules' names).
        taus: ``{module: τ_t}``.
        head: Every pool head (:class:`~compolab.heads.IncrementalHead`); the data's targets are its
            columns.
        data: The evaluation images (a few per task: :meth:`ProbeData.from_benchmark`).
        curvature: F of the second-order prediction: ``"fisher"``, a diagonal Fisher or a K-FAC.
        batch_size: Images per forward when the caches are built.
        cache_size: Compositions whose logits are kept.
    """

    def __init__(
        self,
        backbone: nn.Module,
        theta0: Mapping[str, Tensor],
        taus: Mapping[int, Mapping[str, Tensor]],
        head: IncrementalHead,
        data: ProbeData,
        *,
        curvature: str | Curvature = "fisher",
        batch_size: int = 256,
        cache_size: int = 64,
    ) -> None:
        if not taus:
            raise ConfigError("the explorer needs at least one module")
        self.modules = tuple(sorted(taus))
        self.names = check_directions(theta0, [taus[t] for t in self.modules])
        self.theta0 = {n: theta0[n].detach() for n in self.names}
        self.taus = {t: TaskVector({n: taus[t][n].detach() for n in self.names}) for t in self.modules}
        self.head = head.eval().requires_grad_(False)
        self.tasks = data.tasks
        backbone = backbone.eval().requires_grad_(False)
        like = self.theta0[self.names[0]]
        self.trunk, stem = split_stem(backbone, self.names, data.x[self.tasks[0]][:4].to(like.device))
        with torch.no_grad():  # the stem cache: no module touches it
            tokens = {
                t: torch.cat([stem(x.to(like.device)) for x in data.x[t].split(batch_size)])
                for t in self.tasks
            }
        self.data = ProbeData(tokens, {t: data.y[t].to(like.device) for t in self.tasks})
        self._x = torch.cat([tokens[t] for t in self.tasks])
        self._y = torch.cat([self.data.y[t] for t in self.tasks])
        self._rows = torch.cat([torch.full((len(self.data.y[t]),), k) for k, t in enumerate(self.tasks)])
        self._column_task = torch.tensor(
            [t for t, cs in zip(head.tasks, head.classes, strict=True) for _ in cs]
        )
        self._stacked = {n: torch.stack([self.taus[t][n] for t in self.modules]) for n in self.names}
        flat = torch.stack([self.taus[t].flatten().double() for t in self.modules])
        self.gram = flat @ flat.T  # Euclidean τ_sᵀ τ_t: the plane coordinates
        self.quadratic = Quadratic.from_model(
            self.trunk,
            self.theta0,
            self.taus,
            self.data,
            self.head,
            curvature=curvature,
            batch_size=batch_size,
        )
        self._cache: OrderedDict[tuple[float, ...], Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._planes: dict[tuple, Plane] = {}
        self._curves: dict[tuple, Interpolation] = {}
        self.reference = self.evaluate(self.default_edit())

    @classmethod
    def from_pool(
        cls,
        pool,
        *,
        split: str = "test",
        per_task: int = 64,
        seed: int = 0,
        curvature: str = "fisher",
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> Explorer:
        """An explorer of a pool folder (or :class:`~compolab.pool.Pool`), on ``per_task`` seeded
        images of each task's ``split`` (:func:`~compolab.probes.open_pool_probe`).

        ``curvature="diagonal"`` uses the diagonal Fisher the run saved next to the pool; ``"kfac"``
        the K-FAC of the explorer's loss at θ0 on its images
        (:func:`~compolab.probes.curvatures.probe_curvature`).
        """
        from compolab.probes import open_pool_probe

        pp = open_pool_probe(pool, split=split, per_task=per_task, seed=seed, device=device)
        if curvature == "diagonal":
            if pp.fisher is None:
                raise ConfigError("this pool's run kept no diagonal Fisher; use curvature='fisher'")
            curvature = pp.fisher
        elif curvature == "kfac":
            curvature = probe_curvature("kfac", pp.backbone, pp.theta0, pp.head, pp.data)
        return cls(pp.backbone, pp.theta0, pp.taus, pp.head, pp.data, curvature=curvature, **kwargs)

    # ------------------------------------------------------------------ edits

    def default_edit(self) -> Edit:
        """The pool's composition: every module kept with w_t = 1/T, every head."""
        T = len(self.modules)
        return Edit(tuple([1.0 / T] * T), tuple(["keep"] * T))

    def edit(self, **changes) -> Edit:
        """The default edit with ``changes`` (``coefs``, ``modes``, ``heads``)."""
        return replace(self.default_edit(), **changes)

    @torch.no_grad()
    def logits(self, coefs: Sequence[float]) -> tuple[Tensor, bool]:
        """``(logits, cached)`` of θ0 + Σ c_t τ_t on every evaluation image (all heads)."""
        key = tuple(round(float(c), 12) for c in coefs)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key], True
        c = torch.tensor(key, dtype=self.theta0[self.names[0]].dtype)
        params = {n: self.theta0[n] + torch.tensordot(c, self._stacked[n], dims=1) for n in self.names}
        out = self.head(functional_call(self.trunk, params, (self._x,)))
        self._cache[key] = out
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out, False

    def evaluate(self, edit: Edit, pair: tuple[int, int] | None = None) -> View:
        """Accuracy, measured and predicted loss, and plane coordinates of an edit.

        Args:
            edit: The edit (one weight and mode per module).
            pair: The plane's two modules (default: the first two).
        """
        start = time.perf_counter()
        if len(edit.coefs) != len(self.modules):
            raise ConfigError(f"the pool has {len(self.modules)} modules, the edit {len(edit.coefs)} weights")
        coefs = edit.effective
        logits, cached = self.logits(coefs)
        kept = {t for t, m in zip(self.modules, edit.modes, strict=True) if m == "keep"}
        allowed = torch.ones(len(self._column_task), dtype=torch.bool)
        if edit.heads == "composed":
            allowed = torch.tensor([t in kept for t in self._column_task.tolist()])
        pred = logits.masked_fill(~allowed.to(logits.device), float("-inf")).argmax(-1)
        correct = (pred == self._y).double().cpu()
        losses = F.cross_entropy(logits, self._y, reduction="none").double().cpu()
        accuracy, per_task = {}, {}
        for k, t in enumerate(self.tasks):
            rows = self._rows == k
            accuracy[t] = 100.0 * float(correct[rows].mean())
            per_task[t] = float(losses[rows].mean())
        roles = {t: "control" if t in kept or t not in self.modules else "target" for t in self.tasks}
        (a, b), off = self.plane_coords(coefs, pair) if len(self.modules) > 1 else ((nan, nan), nan)
        return View(
            edit,
            accuracy,
            roles,
            sum(per_task.values()) / len(per_task),
            self.quadratic.predict(coefs),
            (a, b),
            off,
            time.perf_counter() - start,
            cached,
            per_task,
        )

    def plane_coords(
        self, coefs: Sequence[float], pair: tuple[int, int] | None = None
    ) -> tuple[tuple[float, float], float]:
        r"""``((a, b), off)``: the least-squares coordinates of :math:`\Delta = \sum_t c_t\tau_t` on
        the plane :math:`a\tau_i + b\tau_j` and the relative distance of Δ from it (:math:`O(T^2)`);
        the minimum-norm ones when τ_i and τ_j are parallel (the modules of a merged pool)."""
        i, j = self._pair(pair)
        c = torch.tensor([float(v) for v in coefs], dtype=torch.float64)
        idx = [self.modules.index(i), self.modules.index(j)]
        rhs = self.gram[idx] @ c
        ab = torch.linalg.pinv(self.gram[idx][:, idx]) @ rhs  # min-norm: parallel modules (a merged pool)
        total = float(c @ self.gram @ c)
        residual = max(total - float(ab @ rhs), 0.0)
        return (float(ab[0]), float(ab[1])), (residual / total) ** 0.5 if total > 0 else 0.0

    def _pair(self, pair: tuple[int, int] | None) -> tuple[int, int]:
        if len(self.modules) < 2:
            raise ConfigError("a plane needs two modules; this pool has one")
        i, j = pair if pair is not None else self.modules[:2]
        if i == j or i not in self.modules or j not in self.modules:
            raise ConfigError(f"a plane needs two different modules of {list(self.modules)}, got {(i, j)}")
        return i, j

    # ------------------------------------------------------------------ probes on the cached stem

    def plane(
        self,
        pair: tuple[int, int] | None = None,
        *,
        steps: int = 9,
        span: tuple[float, float] = (-0.5, 1.5),
        progress: bool = False,
    ) -> Plane:
        """The measured loss on θ0 + a τ_i + b τ_j (:func:`compolab.probes.plane`), computed once per pair."""
        i, j = self._pair(pair)
        key = (i, j, steps, tuple(span))
        if key not in self._planes:
            self._planes[key] = plane(
                self.trunk,
                self.theta0,
                self.taus[i],
                self.taus[j],
                self.data,
                self.head,
                span=span,
                steps=steps,
                labels=(f"τ{i}", f"τ{j}"),
                progress=progress,
                marks={"θ0": (0.0, 0.0), f"τ{i}": (1.0, 0.0), f"τ{j}": (0.0, 1.0)},
            )
        return self._planes[key]

    def predicted_plane(self, pl: Plane, pair: tuple[int, int] | None = None) -> list[list[float]]:
        """The second-order prediction on the grid of ``pl`` (``[len(b)][len(a)]``), O(T²) a point."""
        i, j = self._pair(pair)
        w = torch.zeros(len(pl.b), len(pl.a), len(self.modules), dtype=torch.float64)
        w[..., self.modules.index(i)] = torch.tensor(pl.a, dtype=torch.float64)
        w[..., self.modules.index(j)] = torch.tensor(pl.b, dtype=torch.float64)[:, None]
        return (
            self.quadratic.predict_tasks(w.reshape(-1, len(self.modules)))
            .mean(-1)
            .reshape(w.shape[:2])
            .tolist()
        )

    def curve(
        self, module: int, lambdas: Sequence[float] | None = None, *, progress: bool = False
    ) -> Interpolation:
        """Loss and accuracy along θ0 + λ τ_t (:func:`compolab.probes.interpolate`), computed once."""
        if module not in self.modules:
            raise ConfigError(f"unknown module {module}; the modules are {list(self.modules)}")
        lams = tuple(default_lambdas(-0.5, 2.0, 21) if lambdas is None else lambdas)
        key = (module, lams)
        if key not in self._curves:
            self._curves[key] = interpolate(
                self.trunk,
                self.theta0,
                self.taus[module],
                self.data,
                self.head,
                lams,
                label=f"τ{module}",
                own=[module],
                progress=progress,
            )
        return self._curves[key]
