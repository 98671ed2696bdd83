"""``quantkit``: argument parsing and subcommand dispatch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rich.console import Console

from ..core.errors import QuantkitError

COMMANDS = ("quantize", "backends", "plugins", "config", "estimate", "compare", "recommend", "finetune")
"""Modules of :mod:`quantkit.cli`, each with ``add_parser(subparsers)``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantkit", description="Quantize neural networks with many backends.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __package__).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args) or 0
    except QuantkitError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
