"""``quantkit``: the parser built from the registered commands, and dispatch."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.text import Text

from ..core.errors import QuantkitError
from ..core.registry import Registry, get_registry


def build_parser(registry: Registry, selected: str | None = None) -> argparse.ArgumentParser:
    """One subparser per registered command; only ``selected``'s is configured (the others'
    modules need not even be imported for ``quantkit --help``)."""
    parser = argparse.ArgumentParser(prog="quantkit", description="Quantize neural networks with many backends.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in registry.commands.values():
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        if command.name == selected:
            command.configure(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    console = Console(stderr=True)
    try:
        registry = get_registry()
        # the top-level options take no values: the first other word names the command
        name = next((word for word in argv if not word.startswith("-")), None)
        if name is not None:
            registry.command(name)  # an unknown one fails here, naming the closest
        args = build_parser(registry, name).parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        return registry.command(args.command).run(args) or 0
    except QuantkitError as exc:
        console.print(Text.assemble(("error:", "bold red"), f" {exc}"), soft_wrap=True)  # the message as is
        return 2


if __name__ == "__main__":
    sys.exit(main())
