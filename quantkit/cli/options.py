"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.config import QuantConfig
from ..core.errors import ConfigValueError


def add_config_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--config", type=Path, help="a JSON (or YAML) config file")
    group.add_argument("--method", help="a quant_method (gptq, gguf, ...) or preset (nf4, int8, gguf-q4_k_m, ...)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
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


def read_config_file(path: Path) -> dict[str, Any]:
    """A config dict from JSON or YAML."""
    from ..core.errors import ModelFormatError

    if not path.is_file():
        raise ModelFormatError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:
        raise ModelFormatError(f"config file {str(path)!r} could not be parsed: {exc}") from exc


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    from ..core.resolve import config_from_dict
    from ..core.resolve import preset

    overrides = parse_overrides(args.overrides)
    if args.config is not None:
        return config_from_dict({**read_config_file(args.config), **overrides})
    return preset(args.method, overrides)
