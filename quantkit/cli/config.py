"""``quantkit config validate FILE``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.config_files import read_config_file
from ..core.resolve import config_from_dict


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    validate = actions.add_parser("validate", help="check a JSON/YAML config file and print it normalized")
    validate.add_argument("file", type=Path)


def run(args: argparse.Namespace) -> int:
    """``validate`` (the only action): print the file's config, normalized, as JSON."""
    config = config_from_dict(read_config_file(args.file))
    print(config.to_json_string(), end="")
    return 0
