"""Progress bars show the memory in use."""

from __future__ import annotations

import re

import psutil

from quantkit.core.progress import MemoryColumn, track


def test_memory_column_shows_the_resident_memory_and_its_peak() -> None:
    column = MemoryColumn()
    first = re.fullmatch(r"RSS (\d+\.\d\d) GiB \(peak (\d+\.\d\d)\)", column.render(None).plain)
    assert first, column.render(None).plain
    rss, peak = (float(value) for value in first.groups())
    assert abs(rss - psutil.Process().memory_info().rss / 2**30) < 0.1
    ballast = bytearray(300 * 2**20)  # 300 MiB more, touched
    ballast[::4096] = b"x" * len(ballast[::4096])
    _, grown = (float(v) for v in re.findall(r"\d+\.\d\d", column.render(None).plain))
    del ballast
    _, kept = (float(v) for v in re.findall(r"\d+\.\d\d", column.render(None).plain))
    assert grown >= peak + 0.25 and kept == grown  # the peak stays


def test_track_yields_every_item_with_the_bar_shown(monkeypatch) -> None:
    monkeypatch.delenv("QUANTKIT_QUIET", raising=False)
    assert list(track(range(5), "items")) == [0, 1, 2, 3, 4]
