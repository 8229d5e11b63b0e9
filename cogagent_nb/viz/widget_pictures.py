"""Pictures that widget callbacks draw: figures pyplot never sees, shown as PNGs.

Why not `plt.subplots` + `display(fig)` as in a cell: ipykernel 7 handles some widget (comm) messages on
a *subshell* thread, and after each one `comm` fires IPython's `post_execute` event, on which the inline
backend's `flush_figures` draws, displays and closes every open pyplot figure. A callback drawing a pyplot
figure on the main thread at that moment races it: measured in JupyterLab, lesson 01's sample browser and
lesson 07's prediction browser showed blank or half-drawn screenshots after a click (the figure's data
intact, its PNG 1-13 KB of white instead of ~25-45 KB). A `Figure` made without pyplot is in no list that
`flush_figures` reads, so nothing else can draw or close it.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure


def detached_subplots(*args: Any, figsize: tuple[float, float] | None = None, **kwargs: Any) -> tuple[Figure, Any]:
    """`plt.subplots(...)` for a figure that pyplot does not track (same arguments, same return)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def png_picture(fig: Figure) -> Any:
    """The figure as an `IPython.display.Image` (PNG, trimmed like the inline backend's pictures)."""
    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return Image(data=buffer.getvalue(), format="png")
