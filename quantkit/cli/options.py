"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.config import QuantConfig
from ..core.config_files import read_config_file
from ..core.errors import ConfigValueError
from ..core.resolve import config_from_dict, preset


def add_config_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--config", type=Path, help="a JSON (or YAML) config file")
    group.add_argument("--method", help="a quant_method (gptq, gguf, ...) or preset (nf4, int8, gguf-q4_k_m, ...)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (value parsed as JSON when it can be), repeatable",
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigValueError("--set", "KEY=VALUE", item, "KEY=VALUE, e.g. bits=4 or quant_type=Q4_K_M")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    overrides = parse_overrides(args.overrides)
    if args.config is not None:
        return config_from_dict({**read_config_file(args.config), **overrides})
    return preset(args.method, overrides)
