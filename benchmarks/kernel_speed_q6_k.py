"""Batch-1 speed of the Q6_K kernels on Llama-3.2-1B's Q6_K shapes, weights read from memory.

    python benchmarks/kernel_speed_q6_k.py
    python benchmarks/kernel_speed_q6_k.py --shapes 2048x128256 --rows 1,4 --repeats 20

In llama.cpp's Q4_K_M mix the output head (2048 x 128256 on Llama-3.2-1B), half the MLP down
projections (8192 x 2048) and half the value projections (2048 x 512) are Q6_K. Each shape is
quantized once (seed 0, standard-normal weights) and copied until the copies pass ``--min-mib``
(more than the L3 cache: a decode step reads each weight from memory once, and a single small
layer timed in a loop would be read from cache). Each kernel (``quantkit.set_kernel``) takes the
copies in turn, the kernels interleaved call by call so that the machine's load hits them alike.
Reported per kernel: the best and the median call, G weights/s, and the GB/s of the bytes it reads
(``q6k-avx512``: the stored blocks, 0.82 bytes a weight; ``gemv-inductor``: its int8 codes and
bfloat16 scales, 1.125). Peak RSS is the process's high-water mark, all copies and states held.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time
from pathlib import Path

import torch
from run_log import RunLog  # this folder's scripts import each other when run
from torch import nn

from quantkit.builtin_backends.gguf.qlinear import GGUFLinear
from quantkit.core.dispatch import set_kernel

RESULTS = Path(__file__).parent / "results" / "kernel_speed_q6_k.txt"
SHAPES = "2048x128256,8192x2048,2048x512"
KERNELS = ("q6k-avx512", "gemv-inductor")
BYTES_PER_WEIGHT = {"q6k-avx512": 210 / 256, "gemv-inductor": 1 + 2 / 16}
"""What each kernel reads a weight: the Q6_K blocks; int8 codes and a bfloat16 scale per 16."""


def copies(in_features: int, out_features: int, min_bytes: int) -> list[GGUFLinear]:
    torch.manual_seed(0)
    layer = GGUFLinear.from_linear(nn.Linear(in_features, out_features, bias=False), "Q6_K")
    count = max(2, -(-min_bytes // layer.weight.numel()))
    return [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help="in x out layer shapes, comma-separated")
    parser.add_argument("--rows", default="1", help="input rows, comma-separated (the kernels' GEMV takes 1 to 4)")
    parser.add_argument("--repeats", type=int, default=10, help="passes over the copies")
    parser.add_argument("--min-mib", type=int, default=256, help="copies of a layer up to this many MiB of blocks")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    log = RunLog("kernel_speed_q6_k.py")
    emit = log.emit
    emit(
        f"{'shape in x out':<14} {'rows':>4} {'copies':>6}  {'kernel':<14} {'best ms':>8} {'median ms':>9} "
        f"{'Gw/s':>6} {'GB/s':>6}"
    )
    for shape in args.shapes.split(","):
        in_features, out_features = (int(n) for n in shape.split("x"))
        layers = copies(in_features, out_features, args.min_mib << 20)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
            kernel_layers = {}
            with torch.inference_mode():
                for kernel in KERNELS:
                    kernel_layers[kernel] = (
                        [copy.deepcopy(layer) for layer in layers] if kernel != KERNELS[0] else layers
                    )
                    for layer in kernel_layers[kernel]:
                        set_kernel(layer, kernel)(x)  # choose and prepare: not timed
                times = {kernel: [] for kernel in KERNELS}
                for _ in range(args.repeats):
                    for index in range(len(layers)):
                        for kernel in KERNELS:
                            start = time.perf_counter()
                            kernel_layers[kernel][index](x)
                            times[kernel].append(time.perf_counter() - start)
            weights = in_features * out_features * rows
            for kernel in KERNELS:
                best, median = min(times[kernel]), statistics.median(times[kernel])
                emit(
                    f"{shape:<14} {rows:>4} {len(layers):>6}  {kernel:<14} {best * 1e3:>8.3f} {median * 1e3:>9.3f} "
                    f"{weights / median / 1e9:>6.1f} {weights / rows * BYTES_PER_WEIGHT[kernel] / median / 1e9:>6.1f}"
                )
            ratio = statistics.median(times[KERNELS[1]]) / statistics.median(times[KERNELS[0]])
            emit(f"{shape:<14} {rows:>4}  {KERNELS[0]} / {KERNELS[1]} speed (medians): {ratio:.2f}x")
            del kernel_layers
    emit(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (all copies and states held)")
    log.write(args.out)


if __name__ == "__main__":
    main()
