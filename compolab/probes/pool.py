"""A pool on disk, ready to probe: θ0, its modules as task vectors, one head and probe images.

The only module of :mod:`compolab.probes` that reads a run (the benchmark and θ0 from the pool's
manifest, the saved Fisher from the run's state): it imports the run driver and the methods inside
:func:`open_pool_probe`, so ``import compolab.probes`` does not load the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from compolab.errors import ConfigError
from compolab.fisher_store import DiagonalFisher
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
    pool, *, split: str = "train", per_task: int = 50, seed: int = 0, bench=None, device="cpu"
) -> PoolProbe:
    """Load a pool (folder or :class:`~compolab.pool.Pool`) for probing.

    Args:
        pool: The pool.
        split, per_task, seed: The probe images (:meth:`ProbeData.from_benchmark`).
        bench: The benchmark, when the caller has it already (default: rebuilt from the manifest).
        device: Where θ0, the modules, the head and the Fisher go (the images move per batch).

    Raises:
        ConfigError: An empty pool, or a pool of a linearised method (TMC: its components are
            tangents of the linearised model; probe them with :mod:`compolab.linearize`).
    """
    from compolab.heads import IncrementalHead
    from compolab.methods import get_method, saved_fisher
    from compolab.pool import Pool
    from compolab.run import open_pool_world

    pool = pool if isinstance(pool, Pool) else Pool.open(pool)
    if not pool.tasks():
        raise ConfigError(f"{pool.root} holds no module yet")
    method = pool.manifest.get("method")
    if method is not None and get_method(method).linearised:
        raise ConfigError(f"{pool.root} is a TMC pool: its components are tangents of the linearised model, "
                          "not weights of θ0's model; the basin probes do not apply")  # fmt: skip
    backbone, theta0, loaded = open_pool_world(pool, load_data=bench is None)
    bench = bench if bench is not None else loaded
    entries = pool.load_all(theta0_sha256=pool.manifest["theta0_sha256"], theta0=theta0)
    ids = sorted(entries)
    head = IncrementalHead(
        [entries[t].head for t in ids], tasks=ids, classes=[entries[t].classes for t in ids]
    )
    head = head.requires_grad_(False).eval()
    taus = {t: entries[t].module.delta(theta0).detach() for t in ids}
    names = list(taus[ids[0]])
    data = ProbeData.from_benchmark(bench, head.global_labels.tolist(), ids, split=split, per_task=per_task,
                                    seed=seed)  # fmt: skip
    fisher = saved_fisher(Path(pool.root).parent / "state")
    fisher = fisher.to(device) if fisher is not None else None
    taus = {t: tau.to(device) for t, tau in taus.items()}
    theta0 = {n: theta0[n].to(device) for n in names}
    return PoolProbe(backbone.to(device), theta0, taus, head.to(device), data, fisher)
