"""Subcommands of the ``quantkit`` command line, as plugins register them."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigValueError


@dataclass(frozen=True)
class Command:
    """One ``quantkit NAME`` subcommand.

    ``configure(parser)`` adds its arguments to its own subparser (and may set
    ``parser.description``); it is called only when ``NAME`` is the command being run.
    ``run(args)`` does the work and returns the exit code. quantkit's own subcommands are
    registered through the same hook; a name already taken is refused.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def deferred(reference: str) -> Callable[..., Any]:
    """The function ``"package.module:name"`` names, imported on its first call.

    For ``configure`` and ``run`` of a command whose module imports a heavy library: every
    registry build loads every plugin, so the plugin module itself must stay cheap.
    """
    module, sep, name = reference.partition(":")
    if not sep or not module or not name:
        raise ConfigValueError("deferred", "reference", reference, "'package.module:name'")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = reference
    return call
