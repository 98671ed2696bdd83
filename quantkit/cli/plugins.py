"""``quantkit plugins``: installed plugins, their versions and hooks, and the ones that failed."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..core.registry import get_registry

HOOK_PREFIX = "quantkit_register_"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Every loaded plugin (quantkit's own built-ins and third-party ones) with its version and hooks, "
        "then every plugin that failed and why. Exits with 1 when a plugin failed."
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    host = get_registry().host
    plugins, failures = host.plugins(), host.failures
    if args.json:
        print(
            json.dumps({"plugins": [asdict(p) for p in plugins], "failures": [asdict(f) for f in failures]}, indent=2)
        )
        return 1 if failures else 0
    table = Table(title="quantkit plugins", box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False)
    table.add_column("name", no_wrap=True, min_width=max((len(p.name) for p in [*plugins, *failures]), default=4))
    table.add_column("version")
    table.add_column("registers")
    table.add_column("source", overflow="fold")
    for p in plugins:
        table.add_row(
            Text(p.name), p.version or "-", ", ".join(h.removeprefix(HOOK_PREFIX) for h in p.hooks), Text(p.source)
        )
    for f in failures:
        table.add_row(Text(f.name), "-", Text("FAILED", style="bold red"), Text(f"{f.stage}: {f.reason}"))
    Console().print(table)
    return 1 if failures else 0
