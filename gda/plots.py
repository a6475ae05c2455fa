"""PNG figures for asset metadata and reports: loss curves, grouped bar charts and labelled image grids.

matplotlib with the Agg backend (no display); imported inside the functions so that importing gda
modules that mention plots stays cheap.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import numpy as np


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def line_plot_png(
    series: dict[str, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    x: Sequence[float] | None = None,
    log_x: bool = False,
) -> bytes:
    """One line per series over ``x`` (default 1, 2, ...: epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for label, values in series.items():
        if x is None:
            axes.plot(np.arange(1, len(values) + 1), values, label=label)
        else:
            axes.plot(x, values, label=label, marker=".")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log_y:
        axes.set_yscale("log")
    if log_x:
        axes.set_xscale("log")
    if len(series) > 1:
        axes.legend()
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def image_grid_png(images: Sequence[np.ndarray], labels: Sequence[str], columns: int = 8, title: str = "") -> bytes:
    """A grid of HxWx3 images (uint8 or floats in [0, 1]) with a short label under each."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.1 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(images[index], interpolation="nearest")
            # Explicit line breaks: matplotlib's wrap=True lets neighbouring titles run into each other.
            axis.set_title(textwrap.fill(textwrap.shorten(labels[index], 96), 26), fontsize=5)
    if title:
        figure.suptitle(title, fontsize=9)
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def grouped_bars_png(
    values: dict[str, dict[str, float]], errors: dict[str, dict[str, float]], title: str, ylabel: str
) -> bytes:
    """Bars per group (outer key, e.g. L) and series (inner key, e.g. method), with error bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    groups = list(values)
    series = list(next(iter(values.values())))
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(7, 3.5))
    for position, name in enumerate(series):
        x = np.arange(len(groups)) + (position - (len(series) - 1) / 2) * width
        axes.bar(
            x, [values[g][name] for g in groups], width, yerr=[errors[g][name] for g in groups], label=name, capsize=2
        )
    axes.set_xticks(np.arange(len(groups)), groups)
    axes.set(title=title, ylabel=ylabel)
    axes.legend(fontsize=7, ncols=3)
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def horizontal_bars_png(values: dict[str, float], errors: dict[str, float], title: str, xlabel: str) -> bytes:
    """One bar per label (top to bottom in the given order), with error bars: for many labelled rows."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = list(values)
    figure, axes = plt.subplots(figsize=(6, 0.25 * len(labels) + 1))
    axes.barh(np.arange(len(labels)), [values[k] for k in labels], xerr=[errors[k] for k in labels], capsize=2)
    axes.set_yticks(np.arange(len(labels)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set(title=title, xlabel=xlabel)
    try:
        return _png(figure)
    finally:
        plt.close(figure)
