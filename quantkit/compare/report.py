"""The views of a comparison, all derived from :class:`Result` and its columns: the terminal
table (fit to the terminal's width), the CSV, the Markdown report, and the files written."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.cells import cell_len
from rich.table import Table

from .checks import Check, pareto_front, run_checks
from .plots import plot
from .results import Column, Result, columns_of, write_results

GAP = 2
"""Spaces between the terminal table's columns (a divider and collapsed padding)."""


def _status(result: Result) -> str:
    return "ok" if result.status == "ok" else f"{result.status}: {result.reason}"


def reproducibility(results: Sequence[Result]) -> str:
    """Which methods their backends declare not deterministic, with the perplexity spread measured;
    the others give the same numbers on every run (on the same machine)."""
    varying = [r for r in results if r.measured and r.evaluations is not None]
    if not varying:
        return (
            "Reproducibility: every method gives the same perplexity, KL and top-1 on every run on the same "
            "machine (no backend declares otherwise)."
        )
    parts = [
        f"{r.method} ({r.backend}) perplexity {r.perplexity_min:.5g} to {r.perplexity_max:.5g} over "
        f"{r.evaluations} evaluations of the same quantized model (+{(r.evaluations - 1) * r.eval_seconds:.0f} s)"
        for r in varying
    ]
    return (
        f"Reproducibility: declared not deterministic, the table shows the median: {'; '.join(parts)}. "
        "Every other method gives the same perplexity, KL and top-1 on every run on the same machine."
    )


def terminal_table(results: Sequence[Result], *, width: int, title: str = "quantkit compare") -> Table:
    """The terminal table within ``width`` columns: the lowest-priority columns are left out
    until it fits (named below it, with the abbreviated headers, the methods that did not run
    and :func:`reproducibility`); ``--json`` and the report keep everything."""
    front = set(pareto_front(results))
    columns = columns_of(results, "terminal")
    cells = {
        c.name: [c.header] + [c.cell(r) + (" *" if c.name == "method" and r.method in front else "") for r in results]
        for c in columns
    }
    widths = {name: max(map(cell_len, column)) for name, column in cells.items()}
    shown = list(columns)
    while sum(widths[c.name] for c in shown) + GAP * (len(shown) - 1) > width and max(c.terminal for c in shown) > 1:
        lowest = max(c.terminal for c in shown)
        shown.remove(next(c for c in reversed(shown) if c.terminal == lowest))
    notes = ["* Pareto front (perplexity vs bits/param)"]
    abbreviated = [f"{c.short} = {c.label}" for c in shown if c.short]
    if abbreviated:
        notes.append(", ".join(abbreviated))
    left_out = [c.label for c in columns if c not in shown]
    if left_out:
        notes.append(f"left out at this width: {', '.join(left_out)} (see report.md, --json)")
    notes += [f"{r.method}: {_status(r)}" for r in results if r.status != "ok"]
    notes.append(reproducibility(results))
    table = Table(
        title=title,
        caption="\n".join(notes),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, GAP - 1),
        collapse_padding=True,
    )
    for c in shown:
        table.add_column(
            c.header, justify="left" if c.name == "method" else "right", no_wrap=c.name != "method", overflow="fold"
        )
    for i, result in enumerate(results, start=1):
        table.add_row(*(cells[c.name][i] for c in shown), style=None if result.status == "ok" else "dim")
    return table


def table_rows(results: Sequence[Result], columns: Sequence[Column]) -> list[list[str]]:
    """Formatted cells of ``columns`` for each result, then its status."""
    return [[c.cell(r) for c in columns] + [_status(r)] for r in results]


def to_csv(results: Sequence[Result]) -> str:
    """The CSV columns of every result (dicts and lists as JSON)."""
    keys = [c.name for c in columns_of(results, "csv")]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in results:
        values = {k: getattr(r, k) for k in keys}
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in values.items()})
    return out.getvalue()


def to_markdown(
    results: Sequence[Result],
    protocol_text: str,
    checks: Sequence[Check],
    *,
    wall_seconds: float | None = None,
    command: str | None = None,
    plots: Sequence[Path] = (),
) -> str:
    """The comparison as a Markdown report: protocol, table, reproducibility, Pareto front, checks, plots."""
    columns = columns_of(results, "markdown")
    headers = [c.label for c in columns] + ["status"]
    lines = ["# quantkit compare", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Protocol: {protocol_text}.", ""]
    if wall_seconds is not None:
        workers = sum(r.worker_seconds or 0.0 for r in results)
        lines += [
            f"Wall time of this invocation: {wall_seconds / 60:.1f} min; the methods' workers took "
            f"{workers / 60:.1f} min in all (methods a resumed run skipped included).",
            "",
        ]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in table_rows(results, columns)]
    lines += [
        "",
        "bits/param: stored bits of the quantized linears per weight, measured on the saved files "
        "(scales, zeros and code books included); est.: quantkit's estimator. Δppl: perplexity change "
        "against the float baseline; KL: mean KL(baseline || method) of the next-token distribution; "
        "top-1: how often both predict the same next token. Peak RSS includes loading the float model.",
        "",
        reproducibility(results),
        "",
        f"Pareto front (perplexity vs bits/param): {', '.join(pareto_front(results)) or '-'}",
        "",
        "## Checks",
        "",
    ]
    lines += [f"- {c.line()}" for c in checks]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_reports(
    results: Sequence[Result],
    out: Path,
    protocol_text: str,
    *,
    json_path: Path | None = None,
    wall_seconds: float | None = None,
    command: str | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``report.md`` and the plots into ``out``
    (and the JSON also to ``json_path``); return the paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    checks = run_checks(results)
    written = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "report.md"}
    write_results(written["json"], results)
    if json_path is not None:
        write_results(json_path, results)
        written["json_copy"] = json_path
    written["csv"].write_text(to_csv(results), encoding="utf-8")
    plots = plot(results, out)
    written["markdown"].write_text(
        to_markdown(results, protocol_text, checks, wall_seconds=wall_seconds, command=command, plots=plots),
        encoding="utf-8",
    )
    for p in plots:
        written[p.stem] = p
    return written
