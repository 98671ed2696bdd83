"""Fuzzing campaign over saved quantized folders: thousands of damaged checkpoints, each loaded.

    .venv/bin/python benchmarks/fuzz_checkpoints.py                # 45 seeds per family and format
    .venv/bin/python benchmarks/fuzz_checkpoints.py --seeds 5      # a quick look

A tiny Llama is quantized and saved by every built-in folder format (RTN, GPTQ, AWQ, HQQ,
bitsandbytes NF4 with double quantization, LLM.int8); every mutation family of
``quantkit.testing.fuzz_checkpoints`` is applied with seeds ``0 .. N-1`` to each, and each
result is loaded with ``quantkit.load`` and run once. Outcomes: loaded (and ran), refused with a
``QuantkitError``, escaped (any other exception), hung (over the time bound) or a memory
blowup (over the address-space bound, or a MemoryError). The required result is zero of the
last three. Also reported: the slowest refusal, the largest peak-RSS growth of one attempt,
and the refusal messages by their first words. Fixed seeds: the same inputs on every run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import logging
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

from quantkit.testing.fuzz_checkpoints import MUTATIONS, OUTCOMES, attempt, mutated, saved_folders

SECONDS = 20.0
MEMORY = 2 * 2**30


def peak_rss_reset() -> None:
    """Start a new peak-RSS measurement (Linux: ``VmHWM`` restarts at the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def first_words(message: str) -> str:
    """A refusal message without paths, quoted values and numbers: its kind."""
    message = message.split(": ", 1)[-1]
    message = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\{[^}]*\}|\b-?\d+(\.\d+)?\b", "", message)
    return " ".join(message.split()[:8])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=45, help="seeds per mutation family and format")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    print(f"$ .venv/bin/python benchmarks/fuzz_checkpoints.py {shlex.join(sys.argv[1:])}".rstrip())
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"per-input bounds: {SECONDS:.0f} s, {MEMORY // 2**30} GiB more address space; seeds 0..{args.seeds - 1}")
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    bad, refusals = [], collections.Counter()
    slowest = (0.0, "")
    growth = (0, "")
    with tempfile.TemporaryDirectory(prefix="fuzz-checkpoints-") as tmp:
        with contextlib.redirect_stdout(io.StringIO()):  # hqq prints empty lines as it builds layers
            folders = saved_folders(Path(tmp) / "saved")
        sizes = {m: sum(f.stat().st_size for f in folder.iterdir()) for m, folder in folders.items()}
        print("saved folders: " + ", ".join(f"{m} ({sizes[m] / 1e3:.0f} kB)" for m in folders) + "\n")
        for mutation in MUTATIONS:
            for method, folder in folders.items():
                for seed in range(args.seeds):
                    target = mutated(folder, Path(tmp) / "input", mutation, seed)
                    before = rss()
                    peak_rss_reset()
                    with contextlib.redirect_stdout(io.StringIO()):
                        outcome = attempt(target, seconds=SECONDS, memory_bytes=MEMORY)
                    where = f"{method}, {mutation.name}, seed {seed}"
                    counts[(method, mutation.name)][outcome.kind] += 1
                    if outcome.kind not in ("loaded", "refused"):
                        bad.append(f"{where}: {outcome.kind}: {outcome.detail}")
                    if outcome.kind == "refused":
                        refusals[first_words(outcome.detail)] += 1
                        slowest = max(slowest, (outcome.seconds, where))
                    growth = max(growth, (peak_rss() - before, f"{where} ({outcome.kind})"))
    header = f"{'':36}{'inputs':>8}" + "".join(f"{k:>9}" for k in OUTCOMES)

    def row(label: str, counter: collections.Counter) -> str:
        return f"{label:36}{sum(counter.values()):8}" + "".join(f"{counter[k]:9}" for k in OUTCOMES)

    print("by format")
    print(header)
    for method in folders:
        print(row(method, sum((c for (m, _), c in counts.items() if m == method), collections.Counter())))
    print("\nby mutation family")
    print(header)
    for mutation in MUTATIONS:
        print(row(mutation.name, sum((c for (_, f), c in counts.items() if f == mutation.name), collections.Counter())))
    total = sum(counts.values(), collections.Counter())
    print(row("total", total))
    print(f"\nescaped, hung or memory blowups: {len(bad)}")
    for line in bad[:50]:
        print("  " + line)
    print(f"slowest refusal: {slowest[0]:.2f} s ({slowest[1]})")
    print(f"largest peak-RSS growth of one attempt: {growth[0] / 2**20:.0f} MiB ({growth[1]})")
    print("\nrefusals, first words of the message (count):")
    for words, count in refusals.most_common(40):
        print(f"  {count:6}  {words}")
    print(f"\n{total.total()} inputs in {(time.perf_counter() - start) / 60:.1f} min")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
