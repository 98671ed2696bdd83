"""Subcommands of the ``quantkit`` command line, as plugins register them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One ``quantkit NAME`` subcommand.

    ``configure`` adds its arguments to the subparser; ``run`` does the work and returns the
    exit code. quantkit's own subcommands are registered through the same hook.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
