r"""Loss-landscape and basin probes around θ0: do the modules compose inside the pre-training basin?

Every probe evaluates one fixed multi-task loss at points :math:`\theta_0 + \sum_j c_j d_j` of a
low-dimensional subspace through θ0 (:mod:`~compolab.probes.engine`):

* :func:`interpolate` — the 1-D path θ0 + λτ (:class:`Interpolation`); :func:`composed_path` is the
  same along the composition θ0 + λ·Σ_t w_t τ_t, :func:`segment` the straight path between two
  models (:mod:`~compolab.probes.paths`).
* :func:`plane` — the 2-D plane θ0 + a·u + b·v (:class:`Plane`); :func:`filter_normalized_direction`
  gives Li et al.'s random directions (:mod:`~compolab.probes.planes`).
* :func:`second_order` — the quadratic prediction of a curve from θ0 alone (:class:`SecondOrder`),
  the paper's second-order expansion (Eq. 2) with the Fisher, the Hessian or a diagonal Fisher
  (:mod:`~compolab.probes.taylor`).
* :func:`jensen_gap` — the measured composition gap against its curvature estimate Ω (the paper's
  Jensen bound, Eq. 5–6, and Theorem 1) as modules are added (:class:`JensenGap`,
  :mod:`~compolab.probes.jensen`).
* :func:`probe_curvature` — the K-FAC or the diagonal Fisher of the probes' loss at θ0, the coarser
  curvatures of the second-order view beside the Fisher exact on the modules' span
  (:mod:`~compolab.probes.curvatures`).
* :func:`open_pool_probe` — a trained pool, ready to probe (:class:`PoolProbe`,
  :mod:`~compolab.probes.pool`); :mod:`~compolab.probes.command` is ``compolab probe``.

Equation numbers: the expansion, the Jensen bound and the exact gap (Theorem 1) are numbered as in
the paper's OpenReview version (``OZVTqoli2N``); ITA and IEL are Eq. 11–12 and 18–19 of the
camera-ready version, as everywhere in compolab.
"""

from compolab.probes.curvatures import PROBE_CURVATURES, curvature_gram, probe_curvature
from compolab.probes.engine import Criterion, ProbeData, cross_entropy, evaluate_points
from compolab.probes.jensen import JensenGap, jensen_gap
from compolab.probes.paths import (
    DEFAULT_LAMBDAS,
    Interpolation,
    composed_path,
    default_lambdas,
    interpolate,
    segment,
)
from compolab.probes.planes import Plane, filter_normalized_direction, plane
from compolab.probes.pool import PoolProbe, open_pool_probe
from compolab.probes.taylor import SecondOrder, second_order

__all__ = [
    "Criterion",
    "cross_entropy",
    "ProbeData",
    "evaluate_points",
    "Interpolation",
    "interpolate",
    "composed_path",
    "segment",
    "Plane",
    "plane",
    "filter_normalized_direction",
    "SecondOrder",
    "second_order",
    "JensenGap",
    "jensen_gap",
    "PoolProbe",
    "open_pool_probe",
    "DEFAULT_LAMBDAS",
    "default_lambdas",
    "PROBE_CURVATURES",
    "probe_curvature",
    "curvature_gram",
]
