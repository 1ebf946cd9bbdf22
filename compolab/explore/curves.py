r"""A λ slider along one module, θ0 + λτ_t: notebook 04's interpolation curves and notebook 02's
Taylor parabola (Eq. 2), with the model at λ evaluated live by the :class:`~compolab.explore.Explorer`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from compolab.explore.canvas import Canvas, Throttled, animated
from compolab.explore.edit import Edit, View
from compolab.explore.engine import Explorer

__all__ = ["LambdaWidget"]


class LambdaWidget:
    r"""The loss and accuracy along :math:`\theta_0 + \lambda\tau_t` (measured once with
    :func:`compolab.probes.interpolate`), the second-order parabola of Eq. 2 and the point at λ.

    Args:
        explorer: The engine.
        module: The module to start with (default: the first).
        lambdas: The λ grid of the measured curves (default: 21 points in [−0.5, 2]).
        debounce: Seconds a change waits for the ones that follow it.

    Attributes:
        view: The :class:`~compolab.explore.View` of θ0 + λτ_t.
        predicted: The parabola's value at λ.
    """

    def __init__(
        self,
        explorer: Explorer,
        *,
        module: int | None = None,
        lambdas: Sequence[float] | None = None,
        debounce: float = 0.05,
    ) -> None:
        import ipywidgets as W

        self.explorer, self.lambdas = explorer, lambdas
        mods = explorer.modules
        self.module = W.Dropdown(
            options=[(f"τ{t}", t) for t in mods],
            value=mods[0] if module is None else module,
            description="module",
            layout={"width": "160px"},
        )
        self.lam = W.FloatSlider(
            value=1.0, min=-0.5, max=2.0, step=0.05, description="λ", readout_format=".2f"
        )
        self.image, self.readout = W.Image(format="png"), W.HTML()
        self.box = W.VBox([W.HBox([self.module, self.lam]), self.image, self.readout])
        self.box.add_class("compolab-lambda")
        self.canvas = Canvas((9.5, 3.2), 2)
        self.ax_loss, self.ax_acc = self.canvas.axes
        self._throttle = Throttled(self.refresh, debounce)
        self.lam.observe(self._throttle, "value")
        self.module.observe(self._new_module, "value")
        self._new_module()

    def _new_module(self, _change=None) -> None:
        t = self.module.value
        curve = self.explorer.curve(t, self.lambdas)
        self.parabola = self.explorer.quadratic.along(t)
        for ax in self.canvas.axes:
            ax.clear()
        self.ax_loss.plot(curve.lambdas, curve.mean(), "o-", ms=3, color="black", label="measured ℓ(θ0 + λτ)")
        self.parabola.plot(self.ax_loss, curve.lambdas, color="C0", label="second order (Eq. 2)")
        self.ax_loss.set(
            xlabel="λ", ylabel="multi-task loss", ylim=(0, 1.3 * max(curve.mean())), title=f"loss along τ{t}"
        )
        curve.plot(self.ax_acc, metric="accuracy")
        self.ax_acc.set(ylim=(0, 100), title=f"accuracy along τ{t}")
        self._lines = [animated(ax.axvline(0, color="black", lw=1.2)) for ax in self.canvas.axes]
        self._point = animated(self.ax_loss.plot([], [], "*", ms=13, mfc="gold", mec="black", zorder=5)[0])
        for ax in self.canvas.axes:
            ax.legend(fontsize=7)
        self.canvas.draw_static()
        self.refresh()

    def refresh(self) -> View:
        """Evaluate θ0 + λτ_t and redraw; returns the view."""
        start = time.perf_counter()
        t, lam = self.module.value, float(self.lam.value)
        mods = self.explorer.modules
        self._view = self.explorer.evaluate(
            Edit(tuple(lam if s == t else 0.0 for s in mods), ("keep",) * len(mods))
        )
        self._predicted = self.parabola.predict([lam])[0]
        for line in self._lines:
            line.set_xdata([lam, lam])
        self._point.set_data([lam], [self._view.loss])
        self.image.value = self.canvas.png([*self._lines, self._point])
        own = self._view.accuracy.get(t, float("nan"))
        others = [a for s, a in self._view.accuracy.items() if s != t]
        self.readout.value = (
            f"<span class='lambda'>λ = {lam:.2f}</span>: measured loss <b>{self._view.loss:.4f}</b>"
            f" · second order <b>{self._predicted:.4f}</b> · own task {own:.1f}% · other tasks "
            f"{sum(others) / max(len(others), 1):.1f}% · update "
            f"{1e3 * (time.perf_counter() - start):.0f} ms"
        )
        return self._view

    @property
    def view(self) -> View:
        """The view of θ0 + λτ_t, after any pending update."""
        self._throttle.flush()
        return self._view

    @property
    def predicted(self) -> float:
        """The parabola's value at λ, after any pending update."""
        self._throttle.flush()
        return self._predicted

    def snapshot(self):
        """The figure on display as a static PNG (``IPython.display.Image``)."""
        from IPython.display import Image

        self._throttle.flush()
        return Image(self.image.value)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)
