r"""ipywidgets over an :class:`~compolab.explore.Explorer`: move a weight, watch the composition move.

:class:`ExplorerWidget` has one slider per module weight w_t and one keep / drop / negate toggle
per module, a checkbox for the output classes (every head, or only the kept modules' heads) and the
plane's two modules. It shows, live: per-task accuracy bars (target vs control, with the pool's
composition as a tick), the composed model's marker on the loss plane of the two modules (measured
contours, the second-order prediction dashed), and the measured loss next to its Eq. 2 prediction.
:class:`~compolab.explore.curves.LambdaWidget` is the λ slider along one module.

The figure is drawn off-screen and shown as a PNG (``ipywidgets.Image``): JupyterLab, a static
export (:meth:`ExplorerWidget.snapshot`) and GitHub show the same picture. What does not change
with an edit (contours, axes) is drawn once and kept as a bitmap; an update draws the bars, the
marker and the labels on top of it. Changes are throttled: those that arrive while an update is
pending are drawn together.
"""

from __future__ import annotations

import time

import numpy as np

from compolab.explore.canvas import Canvas, Throttled, animated
from compolab.explore.edit import MODES, Edit, View
from compolab.explore.engine import Explorer

__all__ = ["ExplorerWidget"]

ROLE_COLORS = {"control": "#0173b2", "target": "#d55e00"}


class ExplorerWidget:
    """The composition explorer: weights, modes and heads in; accuracy, basin plane and loss out.

    Args:
        explorer: The engine.
        pair: The plane's two modules (default: the first two).
        plane_steps: Grid points per axis of the measured plane.
        max_weight: Upper end of the weight sliders.
        debounce: Seconds a change waits for the ones that follow it (0: draw every change).

    Attributes:
        view: The :class:`~compolab.explore.View` on display.
        timings: ``{"evaluate_ms", "draw_ms", "update_ms"}`` of the last update.
    """

    def __init__(
        self,
        explorer: Explorer,
        *,
        pair: tuple[int, int] | None = None,
        plane_steps: int = 9,
        max_weight: float = 1.5,
        debounce: float = 0.05,
    ) -> None:
        import ipywidgets as W

        if len(explorer.modules) < 2:
            raise ValueError("the explorer widget needs a pool of at least two modules")
        self.explorer, self.plane_steps, self.span = explorer, plane_steps, (-0.5, max_weight)
        mods = explorer.modules
        self.pair = tuple(pair) if pair is not None else mods[:2]
        w0 = explorer.default_edit().coefs[0]
        self.sliders = [
            W.FloatSlider(
                value=w0,
                min=0.0,
                max=max_weight,
                step=0.05,
                description=f"w{t}",
                readout_format=".2f",
                continuous_update=True,
            )
            for t in mods
        ]
        self.modes = [
            W.ToggleButtons(options=list(MODES), value="keep", style={"button_width": "72px"}) for _ in mods
        ]
        self.heads = W.Checkbox(value=False, description="only the kept modules' classes", indent=False)
        options = [(f"τ{t}", t) for t in mods]
        self.u = W.Dropdown(
            options=options, value=self.pair[0], description="plane u", layout={"width": "150px"}
        )
        self.v = W.Dropdown(
            options=options,
            value=self.pair[1],
            description="v",
            layout={"width": "110px"},
            style={"description_width": "20px"},
        )
        self.reset = W.Button(description="reset", layout={"width": "80px"})
        self.image, self.readout = W.Image(format="png"), W.HTML()
        rows = [W.HBox([s, m]) for s, m in zip(self.sliders, self.modes, strict=True)]
        self.box = W.VBox([*rows, W.HBox([self.heads, self.u, self.v, self.reset]), self.image, self.readout])
        self.box.add_class("compolab-explorer")
        self.canvas = Canvas((11.5, 3.4), 3)
        self.ax_bar, self.ax_plane, self.ax_loss = self.canvas.axes
        self.timings: dict[str, float] = {}
        self._throttle = Throttled(self.refresh, debounce)
        for w in (*self.sliders, *self.modes, self.heads):
            w.observe(self._throttle, "value")
        for w in (self.u, self.v):
            w.observe(self._new_pair, "value")
        self.reset.on_click(self._reset)
        self._draw_static()
        self.refresh()

    def edit(self) -> Edit:
        """The edit the controls describe."""
        return Edit(
            tuple(s.value for s in self.sliders),
            tuple(m.value for m in self.modes),
            "composed" if self.heads.value else "all",
        )

    def refresh(self) -> View:
        """Evaluate the current edit and redraw; returns the new view."""
        start = time.perf_counter()
        self._view = self.explorer.evaluate(self.edit(), self.pair)
        mid = time.perf_counter()
        self.image.value = self.canvas.png(self._draw_dynamic(self._view))
        end = time.perf_counter()
        self.timings = {
            "evaluate_ms": 1e3 * (mid - start),
            "draw_ms": 1e3 * (end - mid),
            "update_ms": 1e3 * (end - start),
        }
        self.readout.value = self._readout(self._view)
        return self._view

    @property
    def view(self) -> View:
        """The view on display, after any pending update."""
        self._throttle.flush()
        return self._view

    def snapshot(self):
        """The figure on display as an ``IPython.display.Image``: a static PNG that GitHub shows."""
        from IPython.display import Image

        self._throttle.flush()
        return Image(self.image.value)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)

    def _new_pair(self, _change=None) -> None:
        if self.u.value == self.v.value:
            self.readout.value = "<b>choose two different modules for the plane</b>"
            return
        self.pair = (self.u.value, self.v.value)
        self._draw_static()
        self.refresh()

    def _reset(self, _button=None) -> None:
        for s, w in zip(self.sliders, self.explorer.default_edit().coefs, strict=True):
            s.value = w
        for m in self.modes:
            m.value = "keep"
        self.heads.value = False

    def _draw_static(self) -> None:
        """Everything that changes only with the plane's pair: contours, bars' axes, references."""
        ex, ref = self.explorer, self.explorer.reference
        for ax in self.canvas.axes:
            ax.clear()
        pl = ex.plane(self.pair, steps=self.plane_steps, span=self.span)
        pl.plot(self.ax_plane, colorbar=False)
        levels = 10 ** np.linspace(*np.log10([np.min(pl.loss), np.max(pl.loss)]), 8)
        self.ax_plane.contour(
            pl.a,
            pl.b,
            ex.predicted_plane(pl, self.pair),
            levels=levels,
            colors="white",
            linestyles="--",
            linewidths=0.7,
        )
        self.ax_plane.set_title("loss on θ0 + a·u + b·v (log10; dashed: Eq. 2)", fontsize=9)
        self.ax_plane.set(xlim=self.span, ylim=self.span)
        (a, b), _ = ex.plane_coords(ref.edit.effective, self.pair)
        self.ax_plane.plot([a], [b], "o", ms=6, mfc="tab:red", mec="white")
        self.ax_plane.annotate(
            "pool", (a, b), textcoords="offset points", xytext=(5, -10), color="white", fontsize=8
        )
        self._marker = animated(self.ax_plane.plot([], [], "*", ms=15, mfc="gold", mec="black", zorder=5)[0])
        x = range(len(ex.tasks))
        self._bars = [animated(b) for b in self.ax_bar.bar(x, [0] * len(x), color=ROLE_COLORS["control"])]
        self._bar_texts = [
            animated(self.ax_bar.text(i, 0, "", ha="center", va="bottom", fontsize=7)) for i in x
        ]
        self.ax_bar.scatter(
            x,
            [ref.accuracy[t] for t in ex.tasks],
            marker="_",
            s=500,
            color="black",
            zorder=4,
            label="pool's composition",
        )
        self.ax_bar.set(
            xticks=list(x), xticklabels=[f"task {t}" for t in ex.tasks], ylim=(0, 109), ylabel="accuracy (%)"
        )
        from matplotlib.patches import Patch

        patches = [Patch(color=c, label=role) for role, c in ROLE_COLORS.items()]
        self._legend = animated(
            self.ax_bar.legend(
                handles=[*self.ax_bar.get_legend_handles_labels()[0], *patches],
                fontsize=7,
                loc="lower right",
                framealpha=0.9,
            )
        )
        self._loss_bars = [animated(b) for b in self.ax_loss.bar([0, 1], [0, 0], color=["0.3", "0.65"])]
        self._loss_texts = [
            animated(self.ax_loss.text(i, 0, "", ha="center", va="bottom", fontsize=8)) for i in (0, 1)
        ]
        self.ax_loss.axhline(ref.loss, color="black", lw=1, ls=":", label="pool's composition")
        self._loss_top = 2.0 * max(ref.loss, ex.quadratic.predict([0.0] * len(ex.modules)))
        self.ax_loss.set(
            xticks=[0, 1],
            xticklabels=["measured", "Eq. 2"],
            ylabel="multi-task loss",
            ylim=(0, self._loss_top),
        )
        self.ax_loss.legend(fontsize=7, loc="upper right")
        for ax in (self.ax_bar, self.ax_loss):
            ax.set_title(" ", fontsize=9)
            animated(ax.title)
        self.canvas.draw_static()

    def _draw_dynamic(self, view: View) -> list:
        """Set the animated artists to ``view``; returns them."""
        for bar, text, t in zip(self._bars, self._bar_texts, self.explorer.tasks, strict=True):
            bar.set_height(view.accuracy[t])
            bar.set_color(ROLE_COLORS[view.roles[t]])
            text.set_text(f"{view.accuracy[t]:.0f}")
            text.set_y(view.accuracy[t])
        target = view.mean_accuracy("target")
        self.ax_bar.title.set_text(
            f"control {view.mean_accuracy('control'):.1f}%   target "
            + ("—" if target != target else f"{target:.1f}%")
        )
        a, b = view.plane
        lo, hi = self.span
        self._marker.set_data([min(max(a, lo), hi)], [min(max(b, lo), hi)])  # clamped to the frame
        self._marker.set_markerfacecolor("gold" if lo <= min(a, b) and max(a, b) <= hi else "none")
        for bar, text, value in zip(
            self._loss_bars, self._loss_texts, (view.loss, view.predicted), strict=True
        ):
            bar.set_height(value)
            text.set_text(f"{value:.3f}")
            text.set_y(min(max(value, 0.0), 0.92 * self._loss_top))
        self.ax_loss.title.set_text(f"off the plane: {100 * view.off_plane:.0f}% of ‖Δ‖")
        return [
            *self._bars,
            *self._bar_texts,
            self._legend,
            self.ax_bar.title,
            self._marker,
            *self._loss_bars,
            *self._loss_texts,
            self.ax_loss.title,
        ]

    def _readout(self, view: View) -> str:
        tasks = self.explorer.tasks
        cells = "".join(
            f"<td class='acc' data-task='{t}' data-role='{view.roles[t]}'>{view.accuracy[t]:.1f}</td>"
            for t in tasks
        )
        head = "".join(f"<th>task {t}</th>" for t in tasks)
        t = self.timings
        return (
            f"<table class='compolab-readout'><tr><th></th>{head}</tr>"
            f"<tr><th>accuracy %</th>{cells}</tr></table>"
            f"<span class='loss'>measured loss <b>{view.loss:.4f}</b> · second order (Eq. 2) "
            f"<b>{view.predicted:.4f}</b></span> · <span class='update'>update {t['update_ms']:.0f} ms "
            f"(model {t['evaluate_ms']:.0f} ms{', cached' if view.cached else ''}, figure "
            f"{t['draw_ms']:.0f} ms)</span>"
        )
