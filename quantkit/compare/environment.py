"""What a measurement ran on, recorded with every result and printed first by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from typing import Any

import torch

from ..core.plugin_host import distribution_version


def environment() -> dict[str, Any]:
    """Versions, CPU, threads and the machine's load."""
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "quantkit": distribution_version("quantkit") or "?",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load,
    }


def run_header() -> str:
    """Two lines a benchmark prints first: the command line it ran with and :func:`environment`."""
    return f"command: {shlex.join([sys.executable, *sys.argv])}\nenvironment: {json.dumps(environment())}"
