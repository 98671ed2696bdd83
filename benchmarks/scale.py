"""Streaming quantization at real sizes: wall time and peak memory of ``quantkit.quantize_streaming``
over a synthetic checkpoint with a real model's shapes.

    .venv/bin/python benchmarks/scale.py                                  # Llama-3.2-1B, RTN 4-bit g128
    .venv/bin/python benchmarks/scale.py --preset Llama-3.1-8B --work /data/scale --config eetq-int8

The float checkpoint (bf16, hub layout) is written first by ``benchmarks/synthetic_checkpoint.py``
in a child process, so that its memory is not counted, and kept under ``--work`` for the next run.
Reported: wall time, peak RSS (``ru_maxrss``: it includes the clean pages of the memory-mapped
shards, which the kernel reclaims under pressure) and peak anonymous memory (``RssAnon`` sampled
every 20 ms: what the process itself holds), beside the float checkpoint's size. The machine may
be shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import quantkit
from quantkit.core.safetensors_files import stored_bytes
from quantkit.testing.synthetic_checkpoints import PRESETS

SAMPLE_SECONDS = 0.02


class AnonymousPeak:
    """The largest ``RssAnon`` of this process while the block runs (sampled in a thread)."""

    def __enter__(self) -> AnonymousPeak:
        self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, self.read())

    @staticmethod
    def read() -> int:
        """``RssAnon`` in bytes."""
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="Llama-3.2-1B")
    parser.add_argument("--config", default="rtn-4bit-g128", help="preset or quant_method (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantkit-scale"), help="folder for the checkpoints")
    args = parser.parse_args()
    source, out = args.work / args.preset, args.work / f"{args.preset}-{args.config}"
    print(f"command: {' '.join(sys.argv)}")
    print(f"load average before: {load_average()}; torch threads {torch.get_num_threads()}")
    if not source.is_dir():
        start = time.perf_counter()
        script = Path(__file__).with_name("synthetic_checkpoint.py")
        subprocess.run([sys.executable, str(script), args.preset, str(source)], check=True)
        print(f"synthetic checkpoint written in {time.perf_counter() - start:.1f} s (child process)")
    baseline = AnonymousPeak.read()
    start = time.perf_counter()
    with AnonymousPeak() as anonymous:
        quantkit.quantize_streaming(source, args.config, out, device="cpu")
    wall = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gib = 2**30
    print(f"{args.preset} -> {args.config}: {wall:.1f} s wall")
    sizes = [stored_bytes(folder, ())["size_bytes"] / gib for folder in (source, out)]
    print(f"float checkpoint {sizes[0]:.2f} GiB, quantized {sizes[1]:.2f} GiB")
    print(f"peak RSS {peak_rss / gib:.2f} GiB (mapped shard pages included)")
    print(f"peak anonymous {anonymous.peak / gib:.2f} GiB ({baseline / gib:.2f} GiB before quantizing: imports)")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
