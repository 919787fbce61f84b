"""The reports' figures: one way to make, save and close a figure.

Every figure is written as PNG and SVG, each atomically (temporary file, then rename), with
the format passed explicitly because the temporary name has no image suffix. SVG text stays
text (``svg.fonttype: none``) and the SVG carries no date and a fixed id salt, so the same
data give the same file. Empty inputs give a panel saying "no data" (:func:`no_data`).
matplotlib is imported lazily with the Agg backend, so importing this module needs no display.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import pandas as pd

from .io import atomic_path

RC = {"svg.fonttype": "none", "svg.hashsalt": "kneurons"}
"""matplotlib settings of every figure (reproducible SVG)."""
DPI = 150
MAX_WIDTH_IN = 13.0
"""No figure is wider than this (13 in x 150 dpi = 1950 px): panels wrap into rows."""


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out_png: str | os.PathLike, out_svg: str | os.PathLike) -> None:
    """Write ``fig`` as PNG (150 dpi) and SVG, each atomically, without dates."""
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight",
                    metadata={"Software": None})
    with atomic_path(out_svg) as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})


@contextlib.contextmanager
def figure(out_png: str | os.PathLike, out_svg: str | os.PathLike, ncols: int, width: float,
           height: float, *, nrows: int = 1, title: str | None = None,
           empty: bool = False) -> Iterator[tuple]:
    """A figure of ``nrows`` x ``ncols`` panels (at least one column), ``width`` inches per
    column and ``height`` in all, with :data:`RC`; saved (:func:`save`) when the body
    returns, closed in any case. Yields ``(fig, axes)``: the panels as a list when
    ``nrows == 1``, else the [nrows][ncols] grid.

    With a ``title``: when ``empty``, the first panel says "no data" under the title (the
    rest of its column is blank), otherwise the title is the figure's, set after the body."""
    plt = pyplot()
    ncols = max(ncols, 1)
    with plt.rc_context(RC):
        fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, height), squeeze=False,
                                 layout="constrained")
        try:
            if title is not None and empty:
                no_data(grid[0][0], title)
                for row in range(1, nrows):
                    grid[row][0].axis("off")
            yield fig, (list(grid[0]) if nrows == 1 else grid)
            if title is not None and not empty:
                fig.suptitle(title)
            save(fig, out_png, out_svg)
        finally:
            plt.close(fig)


def no_data(ax, title: str) -> None:
    """A panel saying "no data"."""
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def layer_bars(ax, bars: Mapping[str, pd.Series], ylabel: str, heading: str,
               **legend) -> None:
    """Side-by-side bars per layer, one series (layer -> count) per legend label."""
    from matplotlib.ticker import MaxNLocator

    width = 0.8 / max(len(bars), 1)
    for k, (label, part) in enumerate(bars.items()):
        ax.bar(part.index.to_numpy() + (k - (len(bars) - 1) / 2) * width, part.to_numpy(),
               width=width, label=label)
    layers = sorted(set().union(*(part.index for part in bars.values())))
    if layers:
        ax.set_xticks(layers)
        ax.set_xlim(min(layers) - 1, max(layers) + 1)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(heading)
    ax.legend(**legend)


def grid_shape(n: int, width: float) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels of ``width`` inches: as many columns as fit in
    :data:`MAX_WIDTH_IN`, at least one."""
    ncols = max(1, min(max(n, 1), int(MAX_WIDTH_IN // width)))
    return -(-max(n, 1) // ncols), ncols


@contextlib.contextmanager
def panels(out_png: str | os.PathLike, out_svg: str | os.PathLike, n: int, width: float,
           height: float, *, title: str, note: str | None = None) -> Iterator[tuple]:
    """A figure of ``n`` panels of ``width`` x ``height`` inches, wrapped into rows so that
    it is at most :data:`MAX_WIDTH_IN` wide; yields ``(fig, axes)`` with the ``n`` panels as
    a flat list (unused cells of the last row are hidden). ``n == 0`` gives one "no data"
    panel. ``note``: a line under the panels (e.g. which panels were left out and why)."""
    nrows, ncols = grid_shape(n, width)
    with figure(out_png, out_svg, ncols, width, height * nrows, nrows=nrows, title=title,
                empty=n == 0) as (fig, grid):
        cells = list(grid) if nrows == 1 else [ax for row in grid for ax in row]
        for ax in cells[max(n, 1):]:
            ax.axis("off")
        yield fig, cells[:n]
        if note:
            fig.text(0.01, -0.01, note, ha="left", va="top", fontsize="small", wrap=True)
