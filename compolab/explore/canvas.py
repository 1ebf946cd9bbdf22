"""Off-screen figures for the widgets, drawn fast, and a throttle for their updates.

:class:`Canvas` keeps what does not change with an edit (contours, axes, legends) as a bitmap and
draws only the animated artists on top of it; the result is a PNG for an ``ipywidgets.Image``, so
JupyterLab, a static export and GitHub show the same picture. :class:`Throttled` coalesces the
changes that arrive while an update is pending.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np

from compolab.plotting import use_style

__all__ = ["Canvas", "animated", "Throttled"]


class Canvas:
    """An off-screen figure whose static part is kept as a bitmap; :meth:`png` draws the animated
    artists (``animated=True``: skipped by a full draw) on top of it and encodes a PNG."""

    def __init__(self, figsize: tuple[float, float], ncols: int, dpi: int = 90) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        use_style()
        self.fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
        FigureCanvasAgg(self.fig)
        self.axes = self.fig.subplots(1, ncols)
        self._background = None

    def draw_static(self) -> None:
        """Lay out and draw everything not animated; keep it as the background."""
        self.fig.set_layout_engine("constrained")
        self.fig.canvas.draw()
        self.fig.set_layout_engine("none")  # frozen: an update never moves the axes
        self._background = self.fig.canvas.copy_from_bbox(self.fig.bbox)

    def png(self, artists) -> bytes:
        """The background plus ``artists``, as PNG bytes."""
        from PIL import Image

        canvas = self.fig.canvas
        canvas.restore_region(self._background)
        for artist in artists:
            self.fig.draw_artist(artist)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buf, format="png", compress_level=1)
        return buf.getvalue()


def animated(artist):
    """Mark an artist as drawn by :meth:`Canvas.png` only; returns it."""
    artist.set_animated(True)
    return artist


class Throttled:
    """Calls ``refresh`` at most once per ``delay`` seconds inside a running event loop (the
    kernel's), at once otherwise (scripts, tests, ``delay=0``)."""

    def __init__(self, refresh, delay: float) -> None:
        self._refresh, self.delay, self._pending = refresh, delay, None

    def __call__(self, _change=None) -> None:
        try:
            loop = asyncio.get_running_loop() if self.delay > 0 else None
        except RuntimeError:
            loop = None
        if loop is None:
            self._refresh()
        elif self._pending is None:
            self._pending = loop.call_later(self.delay, self._fire)

    def flush(self) -> None:
        """Run a pending update now (code that reads a widget's state after changing a control)."""
        if self._pending is not None:
            self._pending.cancel()
            self._fire()

    def _fire(self) -> None:
        self._pending = None
        self._refresh()
