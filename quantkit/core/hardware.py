"""What hardware a torch device is: CUDA and ROCm are told apart by ``torch.version.hip``."""

from __future__ import annotations

import enum
import functools
from pathlib import Path

import torch


class Hardware(str, enum.Enum):
    """Hardware families a backend can declare."""

    CUDA = "cuda"
    ROCM = "rocm"
    MPS = "mps"
    CPU = "cpu"

    def __str__(self) -> str:
        return self.value


def hardware_of(device: torch.device | str) -> Hardware:
    """The hardware family of ``device`` (``cuda`` devices on a HIP build are ROCm)."""
    device = torch.device(device)
    if device.type == "cuda":
        return Hardware.ROCM if torch.version.hip else Hardware.CUDA
    if device.type == "mps":
        return Hardware.MPS
    if device.type == "cpu":
        return Hardware.CPU
    raise ValueError(f"device type {device.type!r} is not one of cuda, mps, cpu")


def default_device() -> torch.device:
    """The best device present: a GPU (CUDA or ROCm), else MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def present_hardware() -> frozenset[Hardware]:
    """The hardware families this machine has: the CPU, and the GPU torch sees."""
    present = {Hardware.CPU}
    if torch.cuda.is_available():
        present.add(hardware_of("cuda"))
    if torch.backends.mps.is_available():
        present.add(Hardware.MPS)
    return frozenset(present)


def resolve_device(device: torch.device | str | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


@functools.cache
def bf16_native(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (not emulated) and correctly."""
    device = resolve_device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    elif device.type == "cpu":
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    else:
        native = True
    if not native:
        return False
    try:
        a = torch.eye(4, device=device, dtype=torch.bfloat16) * 3
        return bool((a @ a).float().diagonal().eq(9).all())
    except RuntimeError:
        return False


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's instruction-set extensions as ``/proc/cpuinfo`` names them (``avx512_bf16``,
    ``amx_tile``); empty where that file does not exist (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        flag
        for line in text.splitlines()
        if line.startswith(("flags", "Features"))
        for flag in line.split(":", 1)[1].split()
    )
