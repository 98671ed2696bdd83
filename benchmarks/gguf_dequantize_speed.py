"""GGUF dequantization on the CPU: quantkit's native dequantizers against the torch ones.

    python benchmarks/gguf_dequantize_speed.py
    python benchmarks/gguf_dequantize_speed.py --shape 2048x8192 --repeats 20

One weight per type (seed 0, standard-normal, ``--shape`` = in x out, Llama-3.2-1B's MLP by
default) is quantized, then dequantized to float32 by :func:`quantkit.builtin_backends.gguf.
native.dequantize` (what ``GGUFLinear.dequantize`` runs on AVX512-BF16 CPUs) and by
:func:`quantkit.builtin_backends.gguf.quants.dequantize` (the device-agnostic torch path),
alternately. Each call allocates its output, as a prompt's dense product does. Reported: best and
median ms, ns a weight, the ratio of the medians, and whether the two outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from run_log import RunLog  # this folder's scripts import each other when run
from torch import nn

from quantkit.builtin_backends.gguf import native, quants
from quantkit.builtin_backends.gguf.qlinear import GGUFLinear

RESULTS = Path(__file__).parent / "results" / "gguf_dequantize_speed.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2048x8192", help="in x out")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    in_features, out_features = (int(n) for n in args.shape.split("x"))
    log = RunLog("gguf_dequantize_speed.py")
    if not native.available():
        raise SystemExit("the native dequantizers do not run on this machine")
    log.emit(f"{'type':<5} {'path':<7} {'best ms':>8} {'median ms':>9} {'ns/weight':>9}")
    for qtype in native.DEQUANTIZED_TYPES:
        torch.manual_seed(0)
        layer = GGUFLinear.from_linear(nn.Linear(in_features, out_features, bias=False), qtype)
        shape = (out_features, in_features)
        paths = {
            "native": partial(native.dequantize, layer.weight, qtype),
            "torch": partial(quants.dequantize, layer.weight, qtype, shape),
        }
        same = torch.equal(paths["native"]().view(torch.int32), paths["torch"]().reshape(-1).view(torch.int32))
        times = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, run in paths.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        for name in paths:
            median = statistics.median(times[name])
            per_weight = median / (in_features * out_features) * 1e9
            log.emit(f"{qtype:<5} {name:<7} {min(times[name]) * 1e3:>8.2f} {median * 1e3:>9.2f} {per_weight:>9.2f}")
        ratio = statistics.median(times["torch"]) / statistics.median(times["native"])
        log.emit(f"{qtype:<5} native {ratio:.1f}x faster (medians); bit-identical: {same}")
    log.emit(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    log.write(args.out)


if __name__ == "__main__":
    main()
