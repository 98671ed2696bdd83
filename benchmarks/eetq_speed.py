"""CPU speed and memory of EETQ's int8 weight-only linear against a float32 ``nn.Linear``.

    python benchmarks/eetq_speed.py                       # 2048 and 4096 squares, batch 1 and 128
    python benchmarks/eetq_speed.py --sizes 4096 --batches 1 --repeats 50

The weight is standard-normal float32 (seed 0); the EETQ layer is ``EetqLinear.from_linear`` of it
(bfloat16 activations; torch's ``_weight_int8pack_mm`` up to ``GEMV_ROWS`` input rows, a bfloat16
GEMM on the int8 codes above). Inputs are float32, calls run under ``torch.inference_mode()``.

Speed: both layers in one process, their calls interleaved (float, EETQ, float, ...) so that a
shared machine's load hits both alike; each time is the best of ``--repeats`` after warm-up, the
speedup their ratio. Memory: each layer alone in a fresh process (no float weight left in the EETQ
one): its state dict's bytes, the resident set once it is built (freed heap returned with
``malloc_trim``), and the resident-set high-water mark over its calls for every batch (reset through
``/proc/self/clear_refs``), torch itself included. The load average is printed with the results.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch import nn

from quantkit.builtin_backends.eetq.kernels import GEMV_ROWS
from quantkit.builtin_backends.eetq.qlinear import EetqLinear

KINDS = ("float32", "eetq")


def build(size: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    linear = nn.Linear(size, size, bias=False)
    with torch.no_grad():
        linear.weight.normal_()
    return {"float32": linear, "eetq": EetqLinear.from_linear(linear, torch.device("cpu"))}


def times(layers: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Best seconds per call of each layer on ``x``, their calls interleaved."""
    best = dict.fromkeys(layers, float("inf"))
    with torch.inference_mode():
        for _ in range(3):
            for layer in layers.values():
                layer(x)
        for _ in range(repeats):
            for kind, layer in layers.items():
                start = time.perf_counter()
                layer(x)
                best[kind] = min(best[kind], time.perf_counter() - start)
    return best


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(field + ":")).split()[1]) * 1024


def memory(kind: str, size: int, batches: list[int]) -> dict:
    """One layer alone in this process: its tensors' bytes, RSS once built, peak RSS over its calls."""
    layer = build(size)[kind]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    inputs = [torch.randn(b, size) for b in batches]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets the high-water mark to the current resident set
    built = rss_bytes("VmRSS")
    with torch.inference_mode():
        for x in inputs:
            for _ in range(3):
                layer(x)
    return {"stored": stored, "built": built, "peak": rss_bytes("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2048,4096", help="square layer sizes, comma-separated")
    parser.add_argument("--batches", default="1,128", help="batch sizes (rows of the input), comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--memory", help=argparse.SUPPRESS)  # "kind,size": measure it in this process, print JSON
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.memory:
        kind, size = args.memory.split(",")
        print(json.dumps(memory(kind, int(size), batches)))
        return

    print("command: python benchmarks/eetq_speed.py " + " ".join(sys.argv[1:]))
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, {platform.machine()}")
    print("load average before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"{'layer':<10} {'batch':>5} {'float32 ms':>10} {'eetq ms':>8} {'speedup':>7}  eetq kernel")
    for size in sizes:
        layers = build(size)
        for batch in batches:
            x = torch.randn(batch, size, generator=torch.Generator().manual_seed(batch))
            best = times(layers, x, args.repeats)
            kernel = "_weight_int8pack_mm" if batch <= GEMV_ROWS else "bfloat16 GEMM"
            print(
                f"{size}x{size:<5} {batch:>5} {best['float32'] * 1e3:>10.3f} {best['eetq'] * 1e3:>8.3f} "
                f"{best['float32'] / best['eetq']:>6.2f}x  {kernel}"
            )
        del layers
    header = f"{'tensors MiB':>11} {'RSS built MiB':>13} {'peak RSS MiB':>12} {'calls +MiB':>10}"
    print(f"{'layer':<10} {'kind':>7} {header}")
    for size in sizes:
        for kind in KINDS:
            cmd = [sys.executable, __file__, "--memory", f"{kind},{size}", "--batches", args.batches]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            mib = {k: v / 2**20 for k, v in r.items()}
            print(
                f"{size}x{size:<5} {kind:>7} {mib['stored']:>11.2f} {mib['built']:>13.1f} {mib['peak']:>12.1f} "
                f"{mib['peak'] - mib['built']:>10.1f}"
            )
    print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("speedup: float32 time / eetq time, each the best of the interleaved repeats; tensors: the layer's")
    print("state dict; RSS built: the process once the layer is built; peak RSS: its high-water mark over the")
    print("calls of every batch (calls +MiB: the difference, the calls' working memory).")


if __name__ == "__main__":
    main()
