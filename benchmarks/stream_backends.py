"""Calibration-free methods streamed from disk against the same methods in memory, on a real
checkpoint: are the outputs the same bytes, and what do the two runs cost?

    .venv/bin/python benchmarks/stream_backends.py            # SmolLM2-135M: hqq-4bit-g64, nf4, gguf-q4_k_m
    .venv/bin/python benchmarks/stream_backends.py --method nf4-dq --method int8

For each method, runs ``quantkit quantize`` twice in child processes (:func:`stream_calibrated.timed`):
in memory (the whole float model loaded) and with ``--stream`` (one module at a time); prints the
wall time, peak RSS and peak anonymous memory of each, then compares the outputs tensor by tensor
(name, dtype, shape, bytes), ``config.json`` as JSON and every other file byte for byte
(:func:`stream_calibrated.compare`). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from run_log import load_average  # this folder's scripts import each other when run
from stream_calibrated import compare, timed

from quantkit.models import default_model_folder

METHODS = ("hqq-4bit-g64", "nf4", "gguf-q4_k_m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="float checkpoint folder (default: the cached SmolLM2-135M)")
    parser.add_argument("--method", action="append", help=f"preset (repeatable; default: {', '.join(METHODS)})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantkit-stream-backends"))
    args = parser.parse_args()
    model = args.model or default_model_folder()
    print(f"command: {' '.join(sys.argv)}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"load average before: {load_average()}; model {model}")
    for method in args.method or METHODS:
        print(f"\n## {method}")
        work = args.work / method
        shutil.rmtree(work, ignore_errors=True)
        base = [sys.executable, "-m", "quantkit", "quantize", "--model", str(model), "--method", method]
        for name, extra in (("memory", []), ("streamed", ["--stream"])):
            wall, rss, anonymous = timed([*base, *extra, "--out", str(work / name)])
            memory = f"peak RSS {rss / 2**20:.0f} MiB, peak anonymous {anonymous / 2**20:.0f} MiB"
            print(f"{name}: {wall:.1f} s wall, {memory}")
        compare(work / "memory", work / "streamed")
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
