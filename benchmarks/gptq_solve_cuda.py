"""GPTQ's in-place solve on a CUDA GPU: the codes and proxy loss against the CPU's on the same
Hessian, and the solve's peak CUDA memory against the one extra ``n x n`` matrix its docstring
claims (the Hessian itself is overwritten with its inverse factor).

    python benchmarks/gptq_solve_cuda.py                       # needs CUDA; about a minute

Shapes: a 1024 x 4096 weight (CPU compared) and Llama-3-8B's down_proj, 4096 x 14336 (CUDA only),
each against a Hessian of 4096 correlated random tokens accumulated on the GPU. Written to
``benchmarks/results/gptq_solve_cuda.txt``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from run_log import RunLog  # this folder's scripts import each other when run

from quantkit.builtin_backends.gptq.gptq import gptq_quantize
from quantkit.layerwise import HessianAccumulator

RESULTS = Path(__file__).parent / "results" / "gptq_solve_cuda.txt"
SHAPES = ((1024, 4096, True), (4096, 14336, False))
"""(out, in, compare with the CPU)."""
TOKENS = 4096


def correlated_inputs(n: int, tokens: int) -> torch.Tensor:
    """Tokens whose features are mixed and scaled unevenly, so that GPTQ's order and updates matter."""
    mix = torch.randn(n, n) / n**0.5 + torch.eye(n)
    return (torch.randn(tokens, n) @ mix) * torch.linspace(0.2, 3, n)


def check(log: RunLog, out: int, n: int, compare: bool) -> None:
    cuda = torch.device("cuda")
    weight = torch.randn(out, n) * 0.02
    accumulator = HessianAccumulator(n, device=cuda)
    inputs = correlated_inputs(n, TOKENS)
    accumulator.add_batch(inputs.to(cuda).view(4, -1, n))
    H = accumulator.H
    if compare:
        on_cpu = HessianAccumulator(n)
        on_cpu.add_batch(inputs.view(4, -1, n))
        diff = ((H.cpu() - on_cpu.H).abs().max() / on_cpu.H.abs().max()).item()
        log.emit(f"{out} x {n}: Hessian accumulated on CUDA vs CPU, max difference / max entry {diff:.2e}")
        same_hessian = H.cpu()
    weight_cuda = weight.to(cuda)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = gptq_quantize(weight_cuda, H, bits=4, group_size=128, overwrite_hessian=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    extra = torch.cuda.max_memory_allocated() - before
    square = 4 * n * n
    log.emit(
        f"{out} x {n}: CUDA solve {seconds:.2f} s, loss {result.loss:.4g}; peak above its inputs "
        f"{extra / 2**20:.0f} MiB = {extra / square:.2f} n^2 float32 (claimed: 1 n^2 and the weight's "
        f"float32 copies, {4 * 4 * out * n / square:.2f} n^2)"
    )
    if compare:
        start = time.perf_counter()
        reference = gptq_quantize(weight, same_hessian, bits=4, group_size=128)
        cpu_seconds = time.perf_counter() - start
        equal = (reference.intweight == result.intweight.cpu()).double().mean().item()
        log.emit(
            f"{out} x {n}: CPU solve {cpu_seconds:.2f} s on {torch.get_num_threads()} threads, loss "
            f"{reference.loss:.4g}; codes equal {equal:.4%}, loss CUDA / CPU {result.loss / reference.loss:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gptq_solve_cuda: no CUDA GPU on this machine")
    torch.manual_seed(0)
    log = RunLog("gptq_solve_cuda.py")
    log.emit(f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    for out, n, compare in SHAPES:
        check(log, out, n, compare)
        torch.cuda.empty_cache()
    log.write(args.out)


if __name__ == "__main__":
    main()
