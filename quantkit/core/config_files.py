"""Reading the JSON and YAML files users write configs and method lists in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .errors import ModelFormatError


def read_config_file(path: Path) -> Any:
    """The data of a JSON or YAML (``.yaml``/``.yml``) file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:
        raise ModelFormatError(f"config file {str(path)!r} could not be parsed: {exc}") from exc
