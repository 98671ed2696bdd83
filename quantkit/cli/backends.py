"""``quantkit backends``: every backend and what it declares."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

KEYS = (
    "name", "available", "reason", "quantize_hardware", "inference_hardware",
    "bits", "requires_calibration", "serializable", "trainable",
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("backends", help="list backends and their capabilities")
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")
    parser.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    parser.set_defaults(func=run)


def backend_rows() -> list[dict]:
    """Every backend, then every plugin that failed, as plain rows."""
    from quantkit.core.registry import get_registry

    registry = get_registry()
    rows = [{k: b.describe()[k] for k in KEYS} for b in registry.backends.values()]
    for failure in registry.host.failures:
        rows.append({
            "name": failure.name, "available": False,
            "reason": f"plugin failed at {failure.stage}: {failure.reason}",
            "quantize_hardware": [], "inference_hardware": [], "bits": [],
            "requires_calibration": None, "serializable": None, "trainable": None,
        })
    return rows


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


def run(args: argparse.Namespace) -> int:
    rows = backend_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.markdown:
        print(markdown_table(rows))
        return 0
    table = Table(title="quantkit backends")
    for column in ("backend", "available", "bits", "quantize on", "run on", "calib.", "saves", "LoRA"):
        table.add_column(column)
    for r in rows:
        available = "yes" if r["available"] else f"no: {r['reason']}"
        table.add_row(
            r["name"], available, ", ".join(map(str, r["bits"])), ", ".join(r["quantize_hardware"]),
            ", ".join(r["inference_hardware"]), str(r["requires_calibration"]), str(r["serializable"]),
            str(r["trainable"]),
        )
    Console().print(table)
    return 0
