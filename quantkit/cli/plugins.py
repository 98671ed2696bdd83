"""``quantkit plugins``: installed plugins, their versions and hooks."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from rich.console import Console
from rich.table import Table


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plugins", help="list installed plugins and the hooks they implement")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantkit.core.registry import get_registry

    host = get_registry().host
    plugins = [asdict(p) for p in host.plugins()]
    failures = [asdict(f) for f in host.failures]
    if args.json:
        print(json.dumps({"plugins": plugins, "failures": failures}, indent=2))
        return 0
    table = Table(title="quantkit plugins")
    for column in ("name", "version", "hooks", "source"):
        table.add_column(column)
    for p in plugins:
        table.add_row(p["name"], p["version"] or "-", ", ".join(p["hooks"]), p["source"])
    for f in failures:
        table.add_row(f["name"], "-", f"[red]failed at {f['stage']}[/]", f["reason"])
    Console().print(table)
    return 0
