"""Formatting shared by every layer: secrets masked out of anything printed or logged, money and
durations, and figures saved as images.
Part of the spine: imports nothing else of raylm."""

from __future__ import annotations

import math
import re
from pathlib import Path

# user:password@ in a URI (an MLflow server behind basic auth, a proxy): never logged.
CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/@\s:]+):[^/@\s]+@", re.IGNORECASE)


def redact(value: str) -> str:
    """The value with any URI password replaced by ***."""
    return CREDENTIALS.sub(r"\1:***@", value)


def money(usd: float) -> str:
    """US dollars: cents from $0.01 up ($17.95, $1,234.50); below a cent, two significant digits,
    where a CPU-sized run's cost falls ($0.000018)."""
    if usd >= 0.01 or usd <= 0:
        return f"${usd:,.2f}"
    return f"${usd:.{1 - math.floor(math.log10(usd))}f}"


def duration(seconds: float) -> str:
    """Three significant digits under a minute (0.0155 s, 42.2 s), then one decimal: minutes under
    an hour (45.0 min), hours under two days (6.0 h), then days (21.3 days)."""
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"


def figure(figsize: tuple[float, float]):
    """A matplotlib figure and its axes, outside pyplot: no display or backend is involved (a
    worker, a cluster head, CI), and saving renders it with Agg."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def save_figure(fig, path: str | Path, dpi: int = 110, bbox_inches: str | None = None) -> None:
    """The figure as an image at path (the format from its suffix; folders created), then closed
    if pyplot holds it, which would otherwise keep it in memory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches=bbox_inches)
    if fig.canvas.manager is not None:  # made by pyplot
        import matplotlib.pyplot as plt

        plt.close(fig)
