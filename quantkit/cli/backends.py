"""``quantkit backends``: every backend and what it declares; with ``--kernels``, every kernel."""

from __future__ import annotations

import argparse
import json

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..core.hardware import Hardware
from ..core.plugin_host import ALLOW_ENV, DENY_ENV
from ..core.registry import get_registry

KEYS = (
    "name",
    "available",
    "reason",
    "quantize_hardware",
    "inference_hardware",
    "bits",
    "requires_calibration",
    "serializable",
    "trainable",
)
ALL_HARDWARE = "all"
YES = {True: "yes", False: "no", None: "-"}
LEGEND = (
    "ready: runs on this machine (why not: the notes below); calib.: needs calibration data; "
    f"saves: serializable; LoRA: PEFT fine-tuning; {ALL_HARDWARE}: {', '.join(h.value for h in Hardware)}"
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Every registered backend, what it declares and whether it runs here, then every plugin that failed. "
        "Exits with 1 when a plugin failed."
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")
    parser.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="list every kernel instead: what it serves and declares, and whether it can run here",
    )


def backend_rows(*, builtin_only: bool = False) -> list[dict]:
    """Every backend by name, then every plugin that failed, as plain rows; ``builtin_only``:
    quantkit's own backends only (the README's table), no third party's, no failures."""
    registry = get_registry()
    backends = registry.builtin_backends() if builtin_only else registry.backends
    rows = [{k: b.describe()[k] for k in KEYS} for _, b in sorted(backends.items())]
    for failure in [] if builtin_only else registry.host.failures:
        rows.append(
            {
                "name": failure.name,
                "available": False,
                "reason": f"plugin failed at {failure.stage}: {failure.reason}",
                "quantize_hardware": [],
                "inference_hardware": [],
                "bits": [],
                "requires_calibration": None,
                "serializable": None,
                "trainable": None,
            }
        )
    return rows


def kernel_rows() -> list[dict]:
    """Every registered kernel, highest priority first, with whether this machine can run it."""
    kernels = sorted(get_registry().kernels, key=lambda k: (-k.priority, k.name))
    return [k.to_dict() for k in kernels]


def print_kernels(rows: list[dict], console: Console) -> None:
    """The kernels as a table that fits ``console``'s width, why one cannot run here in numbered notes."""
    notes, cells = [], []
    for r in rows:
        ready = "yes"
        if not r["available"]:
            notes.append(f"({len(notes) + 1}) {r['name']}: {r['reason']}")
            ready = f"no ({len(notes)})"
        needs = [
            *([f"groups {', '.join(map(str, r['group_sizes']))}"] if r["group_sizes"] else []),
            *r["shape_limits"],
            *([f"package {', '.join(r['requires'])}"] if r["requires"] else []),
            *([f"program {', '.join(r['programs'])}"] if r["programs"] else []),
            *([f"CPU {', '.join(r['cpu_features'])}"] if r["cpu_features"] else []),
        ]
        cells.append(
            [
                r["name"],
                ", ".join(r["layers"]) or "every layer",
                ready,
                str(r["priority"]),
                _hardware(r["devices"]),
                ", ".join(r["dtypes"]) + (f" (as {r['compute_dtype']})" if r["compute_dtype"] else ""),
                ", ".join(map(str, r["bits"])) or "any",
                "; ".join(needs) or "-",
            ]
        )
    headers = ("kernel", "serves", "ready", "prio.", "device", "dtypes", "bits", "needs")
    widths = _fitted_widths(headers, cells, wrapping=(1, 4, 5, 7), width=console.width)
    table = Table(title="quantkit kernels", box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False)
    for header, width in zip(headers, widths):
        table.add_column(header, width=width, overflow="fold")
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)
    console.print(
        "prio.: higher is chosen first (each layer runs the fastest kernel that can serve it); dtypes: the "
        "activation dtypes taken (computed as); needs: what a layer must meet",
        markup=False,
        highlight=False,
    )
    for note in notes:
        console.print(note, markup=False, highlight=False)


def markdown_table(rows: list[dict]) -> str:
    """The capability table of the README (availability left out: it depends on the machine)."""
    head = "| backend | bits | quantize on | run on | calibration | serializes | PEFT/LoRA |"
    lines = [head, "|" + "---|" * 7]
    yes = {True: "yes", False: "no", None: "?"}
    for r in rows:
        lines.append(
            f"| {r['name']} | {', '.join(map(str, r['bits']))} | {', '.join(r['quantize_hardware'])} | "
            f"{', '.join(r['inference_hardware'])} | {yes[r['requires_calibration']]} | "
            f"{yes[r['serializable']]} | {yes[r['trainable']]} |"
        )
    return "\n".join(lines)


def print_table(rows: list[dict], console: Console) -> None:
    """The rows as a table that fits ``console``'s width: short headers explained by a legend
    below it, the hardware list ``all`` abbreviated, why a backend is not ready in numbered
    notes; the bits and hardware columns wrap between items, nothing else is cut."""
    notes = []
    cells = []
    for r in rows:
        ready = "yes"
        if not r["available"]:
            notes.append(f"({len(notes) + 1}) {r['name']}: {r['reason']}")
            ready = f"no ({len(notes)})"
        cells.append(
            [
                r["name"],
                ready,
                ", ".join(map(str, r["bits"])) or "-",
                _hardware(r["quantize_hardware"]),
                _hardware(r["inference_hardware"]),
                YES[r["requires_calibration"]],
                YES[r["serializable"]],
                YES[r["trainable"]],
            ]
        )
    headers = ("backend", "ready", "bits", "quantize on", "runs on", "calib.", "saves", "LoRA")
    widths = _fitted_widths(headers, cells, wrapping=(2, 3, 4), width=console.width)
    table = Table(
        title="quantkit backends", box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False
    )
    for header, width in zip(headers, widths):
        table.add_column(header, width=width, overflow="fold")
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)
    console.print(LEGEND, markup=False, highlight=False)
    for note in notes:
        console.print(note, markup=False, highlight=False)


def _fitted_widths(
    headers: tuple[str, ...], cells: list[list[str]], *, wrapping: tuple[int, ...], width: int
) -> list[int]:
    """Column widths within ``width`` (two spaces between columns): the ``wrapping`` columns
    give way, widest first, down to their longest word; the others keep their longest cell."""
    columns = list(zip(headers, *cells))
    widths = [max(len(cell) for cell in column) for column in columns]
    least = [
        max(len(word) for cell in column for word in cell.split()) if i in wrapping else widths[i]
        for i, column in enumerate(columns)
    ]
    while sum(widths) + 2 * (len(widths) - 1) > width:
        shrinkable = [i for i in wrapping if widths[i] > least[i]]
        if not shrinkable:
            break
        widths[max(shrinkable, key=lambda i: widths[i])] -= 1
    return widths


def _hardware(values: list[str]) -> str:
    if set(values) == {h.value for h in Hardware}:
        return ALL_HARDWARE
    return ", ".join(values) or "-"


def run(args: argparse.Namespace) -> int:
    registry = get_registry()
    if args.kernels:
        rows = kernel_rows()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print_kernels(rows, Console())
        return 1 if registry.host.failures else 0
    rows = backend_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.markdown:
        print(markdown_table(rows))
    else:
        print_table(rows, Console())
    if not registry.backends:
        Console(stderr=True).print(
            f"[bold red]no backend is registered[/]: check {ALLOW_ENV} and {DENY_ENV}", highlight=False
        )
    return 1 if registry.host.failures or not registry.backends else 0
