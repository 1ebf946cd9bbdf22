"""Interactive exploration of a pool: move the composition weights, watch the composed model move.

* :class:`Explorer` (:mod:`~compolab.explore.engine`) — edits θ0 + Σ c_t τ_t of a pool evaluated
  on a small fixed set of images, with the second-order prediction of Eq. 2
  (:class:`Quadratic`, :mod:`~compolab.explore.quadratic`) and the composed model's place on the
  plane of two modules;
* :class:`ExplorerWidget` (:mod:`~compolab.explore.widget`) — ipywidgets over an explorer: one
  slider and one keep / drop / negate toggle per module, live accuracy bars, the plane, and a λ
  slider along one module (the Taylor parabola and the interpolation curves; :class:`LambdaWidget`,
  :mod:`~compolab.explore.curves`);
* :func:`~compolab.bench.bench_explore` (:mod:`~compolab.bench.explore`) — ``compolab bench explore``.
"""

from compolab.explore.curves import LambdaWidget
from compolab.explore.edit import HEADS, MODES, Edit, View
from compolab.explore.engine import Explorer
from compolab.explore.quadratic import Quadratic
from compolab.explore.widget import ExplorerWidget

__all__ = ["Explorer", "Edit", "View", "MODES", "HEADS", "Quadratic", "ExplorerWidget", "LambdaWidget"]
