"""``quantkit config validate FILE``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.config_files import read_config_file


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("config", help="work with config files")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    validate = actions.add_parser("validate", help="check a JSON/YAML config file and print it normalized")
    validate.add_argument("file", type=Path)
    validate.set_defaults(func=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    from quantkit.core.resolve import config_from_dict

    config = config_from_dict(read_config_file(args.file))
    print(config.to_json_string(), end="")
    return 0
