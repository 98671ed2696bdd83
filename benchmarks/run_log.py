"""The printed log of a benchmark run, kept for its results file: the command, torch, the CPU, the
OpenMP wait policy and the load average."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


class RunLog:
    """Lines printed as they come and kept; starts with the command line, torch and the load average."""

    def __init__(self, script: str):
        self.lines: list[str] = []
        self.emit(f"command: python benchmarks/{script} " + " ".join(sys.argv[1:]))
        threads = torch.get_num_threads()
        self.emit(
            f"torch {torch.__version__} ({threads} threads), {os.cpu_count()} CPUs, {platform.machine()}, {cpu_model()}"
        )
        # PASSIVE makes idle OpenMP threads sleep: each small kernel call then pays their wake-up (~50 us)
        self.emit(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
        self.emit(f"load average before: {load_average()}")

    def emit(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self, path: Path) -> None:
        """Add the load average at the end and write every line to ``path``."""
        self.emit(f"load average after: {load_average()}")
        path.write_text("\n".join(self.lines) + "\n")
