"""A pool on disk, ready to probe: θ0, its modules as task vectors, one head and probe images.

The only module of :mod:`compolab.probes` that reads a pool: through the kit's read side
(:func:`compolab.workspace.open_pool`: θ0 and the benchmark from the manifest, the saved Fisher from
the run's state), imported inside :func:`open_pool_probe`, so ``import compolab.probes`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from compolab.fisher_store import DiagonalFisher
from compolab.heads import IncrementalHead
from compolab.probes.engine import ProbeData
from compolab.task_vector import TaskVector

__all__ = ["PoolProbe", "open_pool_probe"]


@dataclass
class PoolProbe:
    """What a probe needs from a pool: θ0, the modules as task vectors, a head over every pool
    task's classes (class-incremental) and fixed probe images of every task.

    Attributes:
        backbone: θ0's model (eval mode).
        theta0: θ0's tuned weights.
        taus: ``{task: τ_t}``.
        head: The pool's task heads, concatenated.
        data: The probe images.
        fisher: The pool's saved diagonal Fishers summed over tasks, when the run kept them.
    """

    backbone: nn.Module
    theta0: dict[str, Tensor]
    taus: dict[int, TaskVector]
    head: nn.Module
    data: ProbeData
    fisher: DiagonalFisher | None = None


def open_pool_probe(
    pool, *, split: str = "train", per_task: int = 50, seed: int = 0, bench=None, backbone=None, device="cpu"
) -> PoolProbe:
    """Load a pool (folder or :class:`~compolab.pool.Pool`) for probing.

    Args:
        pool: The pool.
        split, per_task, seed: The probe images (:meth:`ProbeData.from_benchmark`).
        bench: The benchmark, when the caller has it already (default: rebuilt from the manifest).
        backbone: θ0's model, when the caller has it already (default: loaded from the manifest).
        device: Where θ0, the modules, the head and the Fisher go (the images move per batch).

    Raises:
        ConfigError: A pool of a linearised method (TMC: its components are
            tangents of the linearised model; probe them with :mod:`compolab.linearize`), or an
            empty pool (:func:`~compolab.workspace.open_pool`).
    """
    from compolab.pool import Pool
    from compolab.workspace import open_pool, require_weights

    pool = pool if isinstance(pool, Pool) else Pool.open(pool)
    require_weights(pool, "the basin probes do not apply")
    opened = open_pool(pool, bench=bench, backbone=backbone)
    entries, theta0 = opened.entries, opened.theta0
    ids = sorted(entries)
    head = IncrementalHead(
        [entries[t].head for t in ids], tasks=ids, classes=[entries[t].classes for t in ids]
    )
    head = head.requires_grad_(False).eval()
    taus = {t: entries[t].module.delta(theta0).detach() for t in ids}
    names = list(taus[ids[0]])
    data = ProbeData.from_benchmark(opened.bench, head.global_labels.tolist(), ids, split=split,
                                    per_task=per_task, seed=seed)  # fmt: skip
    fisher = opened.fisher()
    fisher = fisher.to(device) if fisher is not None else None
    taus = {t: tau.to(device) for t, tau in taus.items()}
    theta0 = {n: theta0[n].to(device) for n in names}
    return PoolProbe(opened.backbone.to(device), theta0, taus, head.to(device), data, fisher)
