"""Reading the JSON and YAML files users write configs and method lists in, safely.

Parsing is bounded: YAML aliases (the "billion laughs" expansion) are refused, nesting deeper
than :data:`MAX_DEPTH` is refused, and every parse failure is a :class:`ModelFormatError`
naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ModelFormatError

MAX_DEPTH = 64
"""Deepest nesting of lists and dicts a config file may have."""


class _NoAliasLoader(yaml.SafeLoader):
    """yaml's safe loader without aliases and with bounded nesting."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"aliases are not allowed in quantkit config files (line {event.start_mark.line + 1})")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nesting deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_depth(value: Any, source: str) -> Any:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise ModelFormatError(f"{source!r} nests deeper than {MAX_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return value


def parse_json(text: str, source: str) -> Any:
    """JSON ``text`` (from ``source``, named in errors) with bounded nesting."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, integers over 4300 digits
        raise ModelFormatError(f"{source!r} is not valid JSON: {type(exc).__name__}: {exc}") from exc
    return _check_depth(value, source)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ModelFormatError(f"config file {str(path)!r} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"config file {str(path)!r} could not be read as UTF-8 text: {exc}") from exc


def read_json(path: str | os.PathLike) -> Any:
    """The data of a JSON file."""
    path = Path(path)
    return parse_json(_read_text(path), str(path))


def read_config_file(path: str | os.PathLike) -> Any:
    """The data of a JSON or YAML (``.yaml``/``.yml``) file."""
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return parse_json(text, str(path))
    try:
        return _check_depth(yaml.load(text, Loader=_NoAliasLoader), str(path))
    except (yaml.YAMLError, RecursionError) as exc:
        raise ModelFormatError(f"config file {str(path)!r} could not be parsed: {exc}") from exc
