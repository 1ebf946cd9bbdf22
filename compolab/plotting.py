"""One figure style for the kit, small plotting helpers and a figure writer.

Figures are written to ``figures/`` only when asked: by an explicit ``out_dir`` or by the
environment variable ``COMPOLAB_FIGURES_DIR`` (``make reproduce`` sets it). Test runs and nbval
therefore never change tracked files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["use_style", "image_grid", "savefig"]


def _in_kernel() -> bool:
    """True inside a Jupyter (IPython) kernel, where figures should be embedded in the notebook."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def use_style() -> None:
    """The kit's matplotlib / seaborn style (white grid, colour-blind palette, compact fonts).

    Inside a Jupyter kernel it also selects the inline backend, whatever ``MPLBACKEND`` says, so
    that a notebook executed headless (``jupyter nbconvert --execute``, nbval) keeps every figure
    as an ``image/png`` output; scripts and the CLI keep their backend.
    """
    import seaborn as sns

    if _in_kernel():
        import matplotlib

        if "inline" not in matplotlib.get_backend():
            matplotlib.use("module://matplotlib_inline.backend_inline")
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", font_scale=0.9)


def image_grid(images: np.ndarray, ncols: int, ax=None, *, titles: list[str] | None = None):
    """Show ``uint8`` images (N, H, W, 3) as one mosaic with ``ncols`` columns; returns the axes."""
    import matplotlib.pyplot as plt

    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    canvas = np.full((nrows * (h + 2), ncols * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncols)
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = img
    ax = ax or plt.gca()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if titles is not None:
        ax.set_xticks([(q + 0.5) * (w + 2) for q in range(min(ncols, len(titles)))])
        ax.set_xticklabels(titles[:ncols], rotation=90, fontsize=7)
    return ax


def savefig(fig, name: str, out_dir: str | Path | None = None) -> Path | None:
    """Write ``fig`` as ``<out_dir>/<name>.png`` (and ``.pdf``) if a figures folder is set.

    Args:
        fig: A matplotlib figure.
        name: File stem, starting with the notebook number (``00_world_grid``).
        out_dir: Folder; default ``$COMPOLAB_FIGURES_DIR``; nothing is written if neither is set.

    Returns:
        The PNG path, or None when nothing was written.
    """
    out_dir = out_dir or os.environ.get("COMPOLAB_FIGURES_DIR")
    if not out_dir:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})
    return out / f"{name}.png"
