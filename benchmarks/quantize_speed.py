"""Speed and accuracy of weight quantizers on one matrix, one table row per quantizer.

    python benchmarks/quantize_speed.py                          # 4096 x 4096, every GGUF type
    python benchmarks/quantize_speed.py --size 1024 --types Q4_K,Q8_0 --threads 1

The input is a standard-normal float32 matrix (seed 0). Each row gives the best-of-3
quantization time, the relative error ||W - deq(q(W))||_F / ||W||_F and the storage cost in
bits per weight (bytes of everything the quantizer returns). GGUF legacy types are also timed
with gguf-py's numpy quantizer, which writes the same bytes; K-quants show the error of
llama.cpp's reference quantizer. Other backends are added as more ``Row`` entries next to
``gguf_rows``. The machine may be shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from quantkit_gguf import quants

# llama.cpp's quantize_row_qX_K_ref on a 4096 x 4096 standard-normal matrix.
LLAMA_CPP_RELATIVE_ERROR = {"Q6_K": 0.0177, "Q5_K": 0.0361, "Q4_K": 0.0714, "Q3_K": 0.151, "Q2_K": 0.297}


class Row(NamedTuple):
    """One quantizer under test: ``quantize(W)`` returns any tensors, ``dequantize`` rebuilds W."""

    name: str
    quantize: Callable[[torch.Tensor], Any]
    dequantize: Callable[[Any], torch.Tensor]
    reference: Callable[[np.ndarray], Any] | None = None  # another implementation, timed alongside
    reference_error: float | None = None  # published error of the method's reference implementation


def gguf_rows(types: list[str], shape: tuple[int, int]) -> list[Row]:
    """Rows for GGUF tensor types; legacy types carry gguf-py's quantizer as the reference."""
    from gguf import GGMLQuantizationType
    from gguf import quants as gguf_quants

    rows = []
    for qtype in types:
        reference = None
        if qtype not in LLAMA_CPP_RELATIVE_ERROR:
            ggml_type = GGMLQuantizationType[qtype]
            reference = lambda a, t=ggml_type: gguf_quants.quantize(a, t)  # noqa: E731
        rows.append(
            Row(
                name=f"gguf {qtype}",
                quantize=lambda w, t=qtype: quants.quantize(w, t),
                dequantize=lambda data, t=qtype: quants.dequantize(data, t, shape),
                reference=reference,
                reference_error=LLAMA_CPP_RELATIVE_ERROR.get(qtype),
            )
        )
    return rows


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Shortest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def storage_bits(result: Any) -> int:
    """Bits held by the tensors (or arrays) in a quantizer's result, searched through containers."""
    if isinstance(result, (torch.Tensor, np.ndarray)):
        return result.nbytes * 8
    if isinstance(result, dict):
        return sum(storage_bits(value) for value in result.values())
    if isinstance(result, (list, tuple)):
        return sum(storage_bits(value) for value in result)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="the matrix is size x size (default 4096)")
    parser.add_argument("--types", default=",".join(quants.QUANT_TYPES), help="comma-separated GGUF types")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per quantizer; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, numpy {np.__version__}")

    weight = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows = gguf_rows([t.strip() for t in args.types.split(",") if t.strip()], tuple(weight.shape))

    header = f"{'quantizer':<12} {'bits/w':>7} {'seconds':>8} {'rel. error':>10} {'reference s':>11} {'speedup':>8} {'ref. error':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        seconds, data = best_of(lambda: row.quantize(weight), args.repeats)
        error = ((row.dequantize(data) - weight).norm() / weight.norm()).item()
        bits = storage_bits(data) / weight.numel()
        ref_seconds = speedup = ""
        if row.reference is not None:
            array = weight.numpy()
            with np.errstate(all="ignore"):
                ref_time, _ = best_of(lambda: row.reference(array), args.repeats)
            ref_seconds, speedup = f"{ref_time:.3f}", f"{ref_time / seconds:.1f}x"
        ref_error = "" if row.reference_error is None else f"{row.reference_error:.4f}"
        print(f"{row.name:<12} {bits:>7.3f} {seconds:>8.3f} {error:>10.4f} {ref_seconds:>11} {speedup:>8} {ref_error:>10}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
