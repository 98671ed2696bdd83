"""Reporting a comparison: derived columns, the Pareto front, sanity checks, and the
terminal table, JSON, CSV, Markdown and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .compare import BASELINE, RESULT_KEYS

MB = 1e6


def summarize(results: Sequence[dict]) -> list[dict]:
    """The results with ``delta_perplexity`` (absolute) and ``delta_perplexity_pct``
    against the float baseline filled in."""
    base = next((r for r in results if r["method"] == BASELINE and r.get("status") == "ok"), None)
    rows = []
    for r in results:
        row = dict(r)
        if base is not None and row.get("perplexity") is not None:
            row["delta_perplexity"] = row["perplexity"] - base["perplexity"]
            row["delta_perplexity_pct"] = 100 * row["delta_perplexity"] / base["perplexity"]
        rows.append(row)
    return rows


def measured(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("perplexity") is not None]


def pareto_front(rows: Sequence[dict], x: str = "bits_per_param", y: str = "perplexity") -> list[str]:
    """Methods no other method beats on both ``x`` and ``y`` (lower is better), by ascending ``x``."""
    points = [r for r in measured(rows) if r.get(x) is not None]
    front = [
        r for r in points
        if not any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in points)
    ]
    return [r["method"] for r in sorted(front, key=lambda r: (r[x], r[y]))]


# -- checks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One sanity check of the results: ``status`` is ``PASS``, ``FAIL`` or ``SKIP``."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


def _verdict(name: str, outcomes: list[tuple[str, bool]], skip: str) -> Check:
    if not outcomes:
        return Check(name, "SKIP", skip)
    status = "PASS" if all(ok for _, ok in outcomes) else "FAIL"
    return Check(name, status, "; ".join(f"{text} {'ok' if ok else 'FAILED'}" for text, ok in outcomes))


def _width(row: dict) -> float | None:
    """The bit class of a result: its stored code width rounded, else its nominal bits."""
    width = row.get("code_bits") or row.get("nominal_bits")
    return None if width is None else float(round(width))


def run_checks(rows: Sequence[dict], ppl_tolerance: float = 0.01, size_tolerance: float = 0.01) -> list[Check]:
    """The checks a default comparison should pass, computed from the results:

    - every 8-bit method within ``ppl_tolerance`` of the baseline's perplexity;
    - every 4-bit method between the worst 8-bit and the best 2-bit one;
    - every calibrated method ahead of round-to-nearest at the same bits (same group size
      and grid where such a run exists);
    - every measured bits/param within ``size_tolerance`` of the estimator's.

    A method's width is its ``code_bits`` (the mean width of its stored weight codes) rounded,
    else its nominal bits: a Q2_K mix whose rows llama.cpp stores as Q4_0 counts as 4-bit.
    """
    ok = [r for r in measured(rows) if r["method"] != BASELINE]
    base = next((r for r in measured(rows) if r["method"] == BASELINE), None)
    by_bits: dict[float, list[dict]] = {}
    for r in ok:
        if r.get("config") is not None and _width(r) is not None:
            by_bits.setdefault(_width(r), []).append(r)
    checks = []

    eight = by_bits.get(8.0, [])
    outcomes = [] if base is None else [
        (f"{r['method']} {r['delta_perplexity_pct']:+.2f}%",
         abs(r["perplexity"] / base["perplexity"] - 1) <= ppl_tolerance)
        for r in eight
    ]
    checks.append(_verdict(f"8-bit within {ppl_tolerance:.0%} of baseline perplexity", outcomes,
                           "needs the baseline and an 8-bit method"))

    four, two = by_bits.get(4.0, []), by_bits.get(2.0, [])
    outcomes = []
    if eight and two:
        low, high = max(r["perplexity"] for r in eight), min(r["perplexity"] for r in two)
        outcomes = [(f"{r['method']} {r['perplexity']:.3f} in [{low:.3f}, {high:.3f}]", low <= r["perplexity"] <= high)
                    for r in four]
    checks.append(_verdict("4-bit between 8-bit and 2-bit perplexity", outcomes,
                           "needs 4-bit, 8-bit and 2-bit methods"))

    outcomes = []
    for r in ok:
        if not r.get("requires_calibration") or _width(r) is None:
            continue
        rtn = [o for o in by_bits.get(_width(r), []) if (o.get("config") or {}).get("quant_method") == "rtn"]
        same_group = [o for o in rtn if o["config"].get("group_size") == r["config"].get("group_size")]
        same_grid = [o for o in same_group if _symmetric(o["config"]) == _symmetric(r["config"])]
        for o in same_grid or same_group or rtn:
            outcomes.append((f"{r['method']} {r['perplexity']:.3f} < {o['method']} {o['perplexity']:.3f}",
                             r["perplexity"] < o["perplexity"]))
    checks.append(_verdict("calibrated methods ahead of RTN at equal bits", outcomes,
                           "needs a calibrated method and RTN at the same bits"))

    outcomes = []
    for r in ok:
        est = r.get("estimated_bits_per_param")
        if est:
            err = r["bits_per_param"] / est - 1
            text = f"{r['method']} {r['bits_per_param']:.3f} vs {est:.3f} ({err:+.2%})"
            outcomes.append((text, abs(err) <= size_tolerance))
    checks.append(_verdict(f"measured bits/param within {size_tolerance:.0%} of the estimator", outcomes,
                           "needs measured methods with estimates"))
    return checks


def _symmetric(config: dict) -> bool | None:
    """Whether a grid has no zero point (GPTQ/RTN ``sym``, AWQ without ``zero_point``); ``None``: unknown."""
    if "sym" in config:
        return bool(config["sym"])
    if "zero_point" in config:
        return not config["zero_point"]
    return None


# -- formats ---------------------------------------------------------------------------------

COLUMNS = (
    ("method", "method", "{}"),
    ("code bits", "code_bits", "{:.2f}"),
    ("bits/param", "bits_per_param", "{:.3f}"),
    ("est. bits", "estimated_bits_per_param", "{:.3f}"),
    ("size MB", "size_bytes", "mb"),
    ("est. MB", "estimated_size_bytes", "mb"),
    ("ppl", "perplexity", "{:.5g}"),
    ("Δppl %", "delta_perplexity_pct", "{:+.2f}"),
    ("KL", "kl_divergence", "{:.3g}"),
    ("top-1", "top1_agreement", "{:.2%}"),
    ("prefill tok/s", "prefill_tokens_per_s", "{:.0f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("quantize s", "quantize_seconds", "{:.1f}"),
    ("peak RSS MB", "peak_rss_bytes", "mb"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "mb":
        return f"{value / MB:.1f}"
    return fmt.format(value)


def _status(row: dict) -> str:
    return "ok" if row.get("status") == "ok" else f"{row.get('status')}: {row.get('reason')}"


TERMINAL_COLUMNS = ("method", "bits/param", "size MB", "ppl", "Δppl %", "KL", "top-1", "decode tok/s",
                    "quantize s", "peak RSS MB")
_SHORT = {"bits/param": "bits", "Δppl %": "Δppl%", "decode tok/s": "dec tok/s", "quantize s": "quant s",
          "peak RSS MB": "RSS MB"}
"""The terminal table's subset of :data:`COLUMNS` (the Markdown report has them all)."""


def table_rows(rows: Sequence[dict], columns: Sequence[str] | None = None) -> list[list[str]]:
    """Formatted cells for the terminal and Markdown tables (last column: status)."""
    chosen = [c for c in COLUMNS if columns is None or c[0] in columns]
    return [[_cell(r, key, fmt) for _, key, fmt in chosen] + [_status(r)] for r in rows]


def rich_table(rows: Sequence[dict], title: str = "quantkit compare"):
    """The terminal table; methods that did not run show their reason below it (caption)."""
    from rich.table import Table

    front = set(pareto_front(rows))
    notes = [f"{r['method']}: {_status(r)}" for r in rows if r.get("status") != "ok"]
    table = Table(title=title, caption="\n".join(notes) or None, caption_justify="left")
    for header in TERMINAL_COLUMNS:
        table.add_column(_SHORT.get(header, header), justify="left" if header == "method" else "right", no_wrap=True)
    for row, cells in zip(rows, table_rows(rows, TERMINAL_COLUMNS)):
        cells = cells[:-1]
        if row["method"] in front:
            cells[0] += " *"
        table.add_row(*cells, style=None if row.get("status") == "ok" else "dim")
    return table


def to_json(rows: Sequence[dict]) -> str:
    return json.dumps(list(rows), indent=2, default=str) + "\n"


def to_csv(rows: Sequence[dict]) -> str:
    keys = list(RESULT_KEYS)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(r[k]) if isinstance(r.get(k), (dict, list)) else r.get(k) for k in keys})
    return out.getvalue()


def to_markdown(rows: Sequence[dict], protocol_text: str, checks: Sequence[Check], *, wall_seconds: float | None = None,
                command: str | None = None, plots: Sequence[Path] = ()) -> str:
    """The comparison as a Markdown report: protocol, table, Pareto front, checks, plots."""
    headers = [h for h, _, _ in COLUMNS] + ["status"]
    lines = ["# quantkit compare", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Protocol: {protocol_text}.", ""]
    if wall_seconds is not None:
        workers = sum(r.get("worker_seconds") or 0.0 for r in rows)
        lines += [f"Wall time of this invocation: {wall_seconds / 60:.1f} min; the methods' workers took "
                  f"{workers / 60:.1f} min in all (methods a resumed run skipped included).", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in table_rows(rows)]
    lines += [
        "",
        "bits/param: stored bits of the quantized linears per weight, measured on the saved files "
        "(scales, zeros and code books included); est.: quantkit's estimator. Δppl: perplexity change "
        "against the float baseline; KL: mean KL(baseline || method) of the next-token distribution; "
        "top-1: how often both predict the same next token. Peak RSS includes loading the float model.",
        "",
        f"Pareto front (perplexity vs bits/param): {', '.join(pareto_front(rows)) or '-'}",
        "",
        "## Checks",
        "",
    ]
    lines += [f"- {c.line()}" for c in checks]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


PLOT_CEILING = 2.5
"""Perplexities above this multiple of the best one are drawn at the top edge, their value in the label."""


def plot(rows: Sequence[dict], out: Path) -> list[Path]:
    """Perplexity vs bits/param (Pareto front marked) and perplexity vs size, as PNG files.

    Float models are horizontal reference lines (a point at 32 bits would squeeze the
    quantized methods into a corner); methods off the scale sit on the top edge.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .compare import FLOAT_METHODS

    rows = [r for r in measured(rows) if r.get("bits_per_param") is not None]
    floats = [r for r in rows if r["method"] in FLOAT_METHODS]
    points = [r for r in rows if r["method"] not in FLOAT_METHODS]
    if not points:
        return []
    backends = sorted({r.get("backend") or "?" for r in points})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    low = min(r["perplexity"] for r in rows)
    ceiling = PLOT_CEILING * low
    top = min(max(r["perplexity"] for r in rows), ceiling) * 1.05
    paths = []
    for x, xlabel, name, scale in (
        ("bits_per_param", "bits per parameter (quantized linears, as stored)", "perplexity_vs_bits.png", 1.0),
        ("size_bytes", "size on disk (MB)", "perplexity_vs_size.png", 1 / MB),
    ):
        fig, ax = plt.subplots(figsize=(11, 6.5), dpi=120)
        ax.set_yscale("log")
        ax.set_ylim(low / 1.05, top)
        xs = [r[x] * scale for r in points]
        ys = [min(r["perplexity"], ceiling) for r in points]
        for backend in backends:
            mine = [(px, py, r) for px, py, r in zip(xs, ys, points) if (r.get("backend") or "?") == backend]
            ax.scatter([px for px, _, _ in mine], [py for _, py, _ in mine], color=colors[backend], label=backend,
                       marker="o", zorder=3, edgecolors=["black" if r.get("requires_calibration") else "none"
                                                         for _, _, r in mine])
        by_name = {r["method"]: r for r in points}
        front = [m for m in pareto_front(rows, x=x) if m in by_name]
        if len(front) > 1:
            ax.plot([by_name[m][x] * scale for m in front], [by_name[m]["perplexity"] for m in front],
                    "--", color="tab:red", label="Pareto front", zorder=2)
        for r in floats:
            ax.axhline(r["perplexity"], color="gray", linewidth=0.8, linestyle=":", zorder=1)
            ax.annotate(f"{r['method']} ({r['perplexity']:.3g}, {r[x] * scale:.4g} "
                        f"{'bits' if x == 'bits_per_param' else 'MB'})", (0.01, r["perplexity"]),
                        xycoords=("axes fraction", "data"), xytext=(0, 3), textcoords="offset points",
                        fontsize=8, color="gray")
        span = max(xs) - min(xs) or 1.0
        ax.set_xlim(min(xs) - 0.05 * span, max(xs) + 0.45 * span)
        _label_points(ax, points, xs, ys, ceiling, offset=0.04 * span)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (log scale, lower is better)")
        ax.set_title(f"perplexity vs {'bits per parameter' if x == 'bits_per_param' else 'size'} "
                     "(black edge: calibrated methods)")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _label_points(ax, points: Sequence[dict], xs: Sequence[float], ys: Sequence[float], ceiling: float,
                  *, offset: float, gap: float = 0.042) -> None:
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
        text = r["method"] if r["perplexity"] <= ceiling else f"{r['method']} (ppl {r['perplexity']:.4g}, off scale)"
        ax.annotate(text, (xs[i], ys[i]), xytext=(xs[i] + offset, placed[i]), textcoords=("data", "axes fraction"),
                    fontsize=7.5, va="center", arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5})


def write_reports(rows: Sequence[dict], out: Path, protocol_text: str, *, json_path: Path | None = None,
                  wall_seconds: float | None = None, command: str | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``report.md`` and the plots into ``out``
    (and the JSON also to ``json_path``); return the paths by kind."""
    from .compare import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    checks = run_checks(rows)
    written = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "report.md"}
    write_json_atomic(written["json"], list(rows))
    if json_path is not None:
        write_json_atomic(json_path, list(rows))
        written["json_copy"] = json_path
    written["csv"].write_text(to_csv(rows), encoding="utf-8")
    plots = plot(rows, out)
    written["markdown"].write_text(
        to_markdown(rows, protocol_text, checks, wall_seconds=wall_seconds, command=command, plots=plots),
        encoding="utf-8",
    )
    for p in plots:
        written[p.stem] = p
    return written
