"""benchmarks/gpu_check.py lists every CUDA claim the registry declares, and refuses to pass without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from quantkit.core.hardware import Hardware
from quantkit.core.kernels import DEQUANTIZE, Kernel
from quantkit.core.registry import get_registry

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    return gpu_check


def dry_run(gpu_check, monkeypatch, capsys) -> list[str]:
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry-run"])
    assert gpu_check.main() == 0
    return [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]


def test_the_dry_run_lists_every_cuda_claim_of_the_registry(gpu_check, monkeypatch, capsys):
    registry = get_registry()
    cuda = frozenset({Hardware.CUDA})
    registry.register_kernel(Kernel("fast-cuda", (torch.nn.Linear,), cuda, DEQUANTIZE.prepare, DEQUANTIZE.matmul))
    # a plugin's kernel is a claim as soon as it registers
    expected = set()
    for backend in registry.backends.values():
        presets = [preset.name for preset in backend.presets]
        # each preset of calibration-free methods, the first of calibrated ones (their solves are slow)
        for preset in presets[:1] if backend.capabilities.requires_calibration else presets:
            if Hardware.CUDA in backend.capabilities.quantize_hardware:
                expected.add(f"quantize {backend.name} {preset} on cuda")
            if Hardware.CUDA in backend.capabilities.inference_hardware:
                expected.add(f"run {backend.name} {preset} on cuda")
    expected |= {f"kernel {k.label} on cuda" for k in registry.kernels if Hardware.CUDA in k.devices}
    listed = dry_run(gpu_check, monkeypatch, capsys)
    assert set(listed) == expected and len(listed) == len(expected)
    assert "kernel eetq (EetqLinear) on cuda" in listed and "kernel fast-cuda (Linear) on cuda" in listed
    assert "kernel int4-cpu (GPTQLinear) on cuda" not in listed
    assert {
        "quantize gptq gptq-4bit-g128 on cuda",
        "run bitsandbytes nf4 on cuda",
        "run gguf gguf-q4_0 on cuda",
    } <= set(listed)
    assert "quantize aqlm aqlm-2x8 on cuda" in listed and "quantize aqlm aqlm-1x16 on cuda" not in listed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_says_so_and_fails(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "out.txt")])
    assert gpu_check.main() == gpu_check.NO_GPU != 0
    assert "no CUDA GPU on this machine" in capsys.readouterr().err
    assert not (tmp_path / "out.txt").exists()
