"""Progress bars show the memory in use."""

from __future__ import annotations

import re
from types import SimpleNamespace

import psutil

from quantkit.core.progress import MemoryColumn, track

GIB = 2**30


def test_memory_column_shows_the_resident_memory_and_its_peak() -> None:
    column = MemoryColumn()
    shown = re.fullmatch(r"RSS (\d+\.\d\d) GiB \(peak (\d+\.\d\d)\)", column.render(None).plain)
    assert shown, column.render(None).plain
    assert abs(float(shown.group(1)) - psutil.Process().memory_info().rss / GIB) < 0.1  # this process's
    readings = iter([1 * GIB, 3 * GIB, 2 * GIB])
    column._process = SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=next(readings)))
    column._peak = 0
    texts = [column.render(None).plain for _ in range(3)]
    assert texts == ["RSS 1.00 GiB (peak 1.00)", "RSS 3.00 GiB (peak 3.00)", "RSS 2.00 GiB (peak 3.00)"]


def test_track_yields_every_item_with_the_bar_shown(monkeypatch) -> None:
    monkeypatch.delenv("QUANTKIT_QUIET", raising=False)
    assert list(track(range(5), "items")) == [0, 1, 2, 3, 4]
