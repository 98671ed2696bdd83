"""Progress bars for long steps, with the process's memory in use (rich; quiet when QUANTKIT_QUIET is set)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import psutil
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

T = TypeVar("T")


class MemoryColumn(ProgressColumn):
    """The resident memory of this process now, and its peak since the bar started (in GiB)."""

    def __init__(self) -> None:
        super().__init__()
        self._process = psutil.Process()
        self._peak = 0

    def render(self, task: Task) -> Text:
        rss = self._process.memory_info().rss
        self._peak = max(self._peak, rss)
        return Text(f"RSS {rss / 2**30:.2f} GiB (peak {self._peak / 2**30:.2f})", style="progress.data.speed")


def track(items: Sequence[T] | Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` behind a progress bar that shows the memory in use."""
    if os.environ.get("QUANTKIT_QUIET"):
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), MemoryColumn())
    with Progress(*columns, transient=True) as progress:
        yield from progress.track(items, total=total, description=description)
