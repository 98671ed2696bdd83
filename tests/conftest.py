"""Shared fixtures: a tiny random Llama for fast tests, the example plugin installed by pip."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("QUANTKIT_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "quantkit-example-plugin"


def make_tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, intermediate: int = 128, vocab: int = 256):
    """A randomly initialised LlamaForCausalLM small enough for unit tests (no outlier channels)."""
    from quantkit.testing import tiny_llama

    return tiny_llama(seed, hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab, outliers=False)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Every test sees the installed plugins only, never another test's additions."""
    from quantkit.core.registry import reset_registry

    reset_registry()
    yield
    reset_registry()


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    """The example plugin installed by pip (into a private target folder)."""
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / EXAMPLE_PLUGIN.name
    shutil.copytree(EXAMPLE_PLUGIN, source)  # build outside the repo: no egg-info left in the tree
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture
def on_path(monkeypatch):
    """Put folders on sys.path (and PYTHONPATH for subprocesses) for one test."""

    def add(folder: Path) -> None:
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
        importlib.invalidate_caches()

    return add
