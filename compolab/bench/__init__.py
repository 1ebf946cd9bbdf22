"""Benchmarks (``compolab bench compose|fisher|tmc|probe|step|explore``): timings live here, never in tests.

* **compose** — :func:`bench_compose` (:mod:`~compolab.bench.compose`): inference cost of a composed
  model of T = 1 and T = 10 modules (one merged model: the same cost), of an output ensemble of 10
  models (10 forwards), and of one IEL training step with 1 and 10 frozen modules (pre-merged).
* **fisher** — :func:`bench_fisher` (:mod:`~compolab.bench.fisher`): the kit's exact diagonal Fisher
  against the official per-class backward loop, and the approximations' errors.
* **tmc** — :func:`bench_tmc` (:mod:`~compolab.bench.tmc`): one linearised forward vs one plain
  forward; a 10-component TMC composition vs a 10-model output ensemble.
* **probe** — :func:`bench_probe` (:mod:`~compolab.bench.probe`): one 41-point basin-probe curve:
  one point per forward, vmapped, a plain loop.
* **step** — :func:`bench_step` (:mod:`~compolab.bench.step`): images/s of a plain LoRA step, an
  ITA step and an IEL step (same model, batch, device, precision), of the Fisher, and MFU against
  the device's bf16 peak when known.
* **explore** — :func:`bench_explore` (:mod:`~compolab.bench.explore`): latency of the composition
  explorer (a weight change, a head-only change, a widget refresh).

All of them time through :mod:`~compolab.bench.timing` (synchronised calls, best-of-N or median of
interleaved rounds, CPU threads).
"""

from compolab.bench.compose import bench_compose
from compolab.bench.explore import bench_explore
from compolab.bench.fisher import bench_fisher
from compolab.bench.probe import bench_probe
from compolab.bench.step import bench_step
from compolab.bench.tmc import bench_tmc

__all__ = ["bench_compose", "bench_fisher", "bench_tmc", "bench_probe", "bench_step", "bench_explore"]
