"""The comparison's plots: perplexity against bits per parameter and against size, as PNG files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .checks import pareto_front
from .results import MB, Result

PLOT_CEILING = 2.5
"""Perplexities above this multiple of the best one are drawn at the top edge, their value in the label."""


def plot(results: Sequence[Result], out: Path) -> list[Path]:
    """Perplexity vs bits/param (Pareto front marked) and perplexity vs size, as PNG files.

    Float models are horizontal reference lines (a point at 32 bits would squeeze the
    quantized methods into a corner); methods off the scale sit on the top edge.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.measured and r.bits_per_param is not None]
    floats = [r for r in results if r.is_float]
    points = [r for r in results if not r.is_float]
    if not points:
        return []
    backends = sorted({r.backend or "?" for r in points})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    low = min(r.perplexity for r in results)
    ceiling = PLOT_CEILING * low
    top = min(max(r.perplexity for r in results), ceiling) * 1.05
    paths = []
    for x, xlabel, name, scale in (
        ("bits_per_param", "bits per parameter (quantized linears, as stored)", "perplexity_vs_bits.png", 1.0),
        ("size_bytes", "size on disk (MB)", "perplexity_vs_size.png", 1 / MB),
    ):
        fig, ax = plt.subplots(figsize=(11, 6.5), dpi=120)
        ax.set_yscale("log")
        ax.set_ylim(low / 1.05, top)
        xs = [getattr(r, x) * scale for r in points]
        ys = [min(r.perplexity, ceiling) for r in points]
        for backend in backends:
            mine = [(px, py, r) for px, py, r in zip(xs, ys, points) if (r.backend or "?") == backend]
            ax.scatter(
                [px for px, _, _ in mine],
                [py for _, py, _ in mine],
                color=colors[backend],
                label=backend,
                marker="o",
                zorder=3,
                edgecolors=["black" if r.requires_calibration else "none" for _, _, r in mine],
            )
        by_name = {r.method: r for r in points}
        front = [m for m in pareto_front(results, x=x) if m in by_name]
        if len(front) > 1:
            ax.plot(
                [getattr(by_name[m], x) * scale for m in front],
                [by_name[m].perplexity for m in front],
                "--",
                color="tab:red",
                label="Pareto front",
                zorder=2,
            )
        for r in floats:
            ax.axhline(r.perplexity, color="gray", linewidth=0.8, linestyle=":", zorder=1)
            ax.annotate(
                f"{r.method} ({r.perplexity:.3g}, {getattr(r, x) * scale:.4g} "
                f"{'bits' if x == 'bits_per_param' else 'MB'})",
                (0.01, r.perplexity),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=8,
                color="gray",
            )
        span = max(xs) - min(xs) or 1.0
        ax.set_xlim(min(xs) - 0.05 * span, max(xs) + 0.45 * span)
        _label_points(ax, points, xs, ys, ceiling, offset=0.04 * span)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (log scale, lower is better)")
        ax.set_title(
            f"perplexity vs {'bits per parameter' if x == 'bits_per_param' else 'size'} "
            "(black edge: calibrated methods)"
        )
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _label_points(
    ax,
    points: Sequence[Result],
    xs: Sequence[float],
    ys: Sequence[float],
    ceiling: float,
    *,
    offset: float,
    gap: float = 0.042,
) -> None:
    """Name every point, its label moved vertically (with a leader line) so that no two overlap."""
    low, high = (math.log(v) for v in ax.get_ylim())
    wanted = [(math.log(y) - low) / (high - low) for y in ys]
    order = sorted(range(len(points)), key=lambda i: wanted[i])
    placed = [0.0] * len(points)
    previous = -math.inf
    for i in order:  # push up to keep the gap, then pull back below the top edge
        previous = placed[i] = max(wanted[i], previous + gap)
    following = 0.98 + gap
    for i in reversed(order):
        following = placed[i] = min(placed[i], following - gap)
    for i, r in enumerate(points):
        text = r.method if r.perplexity <= ceiling else f"{r.method} (ppl {r.perplexity:.4g}, off scale)"
        ax.annotate(
            text,
            (xs[i], ys[i]),
            xytext=(xs[i] + offset, placed[i]),
            textcoords=("data", "axes fraction"),
            fontsize=7.5,
            va="center",
            arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5},
        )
