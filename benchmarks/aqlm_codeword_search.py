"""AQLM's codeword search on the CPU: the native AVX-512 kernel against the torch path.

    python benchmarks/aqlm_codeword_search.py
    python benchmarks/aqlm_codeword_search.py --repeats 5 --threads 1,2

The search k-means and the greedy beam search run (``argmin_k <q_r, c_k> + w_r b_k``,
:func:`quantkit.builtin_backends.aqlm.codeword_search.best_codewords`) on AQLM's shapes: 8-value
groups against 2**16 codewords (1x16) and 2**8 (2x8), random standard-normal queries and codewords
(seed 0). The same inputs go through ``best_codewords`` (the native kernel) and
``torch_best_codewords`` alternately, on each thread count. Reported: median seconds, G scores/s
(a score is 16 FLOPs: 8 multiplies and 8 adds), the ratio of the medians, how many rows chose
another codeword (float rounding between the two paths' sums) and the largest gap between the two
choices' float64 scores; the peak RSS at the end.
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

from quantkit.builtin_backends.aqlm.codeword_search import NATIVE, best_codewords, torch_best_codewords

RESULTS = Path(__file__).parent / "results" / "aqlm_codeword_search.txt"
SHAPES = {"1x16": (16384, 2**16), "2x8": (110592, 2**8)}
"""rows x codewords: 1x16's rows are a sample (the torch path takes ~4 s for these); 2x8's are
SmolLM2's largest linear's groups (576 x 1536 / 8)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not NATIVE.available():
        raise SystemExit("the native codeword search does not run on this machine")
    log = RunLog("aqlm_codeword_search.py")
    log.emit(f"{'scheme':<6} {'threads':>7} {'path':<7} {'median s':>9} {'G scores/s':>10} {'GFLOP/s':>8}")
    for scheme, (rows, size) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        queries, codewords = torch.randn(rows, 8, generator=g), torch.randn(size, 8, generator=g)
        inputs = (queries, codewords, codewords.square().sum(1) / 2, torch.ones(rows))
        paths = {"native": partial(best_codewords, *inputs), "torch": partial(torch_best_codewords, *inputs)}
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            times = {name: [] for name in paths}
            chosen = {}
            for _ in range(args.repeats):
                for name, run in paths.items():
                    start = time.perf_counter()
                    chosen[name] = run()[1]
                    times[name].append(time.perf_counter() - start)
            for name in paths:
                median = statistics.median(times[name])
                rate = rows * size / median / 1e9
                log.emit(f"{scheme:<6} {threads:>7} {name:<7} {median:>9.3f} {rate:>10.2f} {16 * rate:>8.1f}")
            differ = chosen["native"] != chosen["torch"]
            gap = 0.0
            if differ.any():
                scores = queries[differ].double() @ codewords.double().T + inputs[2].double()
                picked = [scores.gather(1, chosen[p][differ, None]) for p in paths]
                gap = float((picked[0] - picked[1]).abs().max())
            ratio = statistics.median(times["torch"]) / statistics.median(times["native"])
            log.emit(
                f"{scheme:<6} {threads:>7} native {ratio:.1f}x faster (medians); "
                f"{int(differ.sum())} of {rows} rows chose another codeword (largest score gap {gap:.2g})"
            )
    log.emit(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    log.write(args.out)


if __name__ == "__main__":
    main()
