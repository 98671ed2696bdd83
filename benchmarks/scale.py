"""Streaming quantization at real sizes, inside a memory cgroup: does a model larger than the
limit quantize, in what wall time and peak memory, against what the estimator predicted?

    .venv/bin/python benchmarks/scale.py                                   # Llama-3.2-1B, RTN 4-bit, 3 GiB
    .venv/bin/python benchmarks/scale.py --preset Llama-3.1-8B --configs gguf-q4_k_m,nf4,rtn-4bit-g128 \
        --limit-gib 3
    .venv/bin/python benchmarks/scale.py --preset Llama-3.1-8B --configs gptq-4bit-g128 --limit-gib 4

The float checkpoint (bf16, hub layout, random weights of ``--preset``'s exact shapes) is written
first by ``benchmarks/synthetic_checkpoint.py`` and kept under ``--work``. Each config then runs
in a child process placed in a cgroup v1 memory group (``/sys/fs/cgroup/memory``, root needed)
whose limit, swap included, is ``--limit-gib``: the group is charged for the page cache the run
reads and writes too, which a plain RSS figure would not count honestly (the kernel reclaims it
under the limit). The page cache is dropped before each run so that the checkpoint's pages are
read inside the group. Calibrated methods get ``--nsamples`` x ``--seqlen`` random token ids (a
synthetic checkpoint has no tokenizer; the cost does not depend on the ids).

Measured per run: exit status (a run the limit killed says so), the wall time of the
``quantize_streaming`` call (what the estimator predicts; rows measured before 2026-12-04 hold
the child process's, imports included) and of the whole child, the group's peak usage
(``memory.max_usage_in_bytes``: anonymous memory and page cache), the peak of its anonymous memory
(``rss`` of ``memory.stat``, sampled every 50 ms), the load average before and after. The runs are
kept in ``results/scale_<preset>.json`` (a config measured again replaces its row) and written out
with the estimator's predicted peak and time for each (``quantkit.estimate_quantization(...,
streaming=True)`` just before the run, in a fresh process with the run's environment, kept with
the row: ``--render`` rewrites the text without measuring).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from run_log import RunLog, load_average  # this folder's scripts import each other when run

from quantkit import as_config
from quantkit.core.hardware import Hardware
from quantkit.core.registry import get_registry
from quantkit.core.safetensors_files import stored_bytes
from quantkit.testing.synthetic_checkpoints import PRESETS

RESULTS = Path(__file__).parent / "results"
"""Each preset's runs are written to ``scale_<preset>.txt`` there."""
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
SAMPLE_SECONDS = 0.05
GIB = 2**30

CHILD = r"""
import json, sys, time, torch, quantkit
source, config, out, nsamples, seqlen = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
vocab = json.load(open(f"{source}/config.json"))["vocab_size"]
calibration = torch.randint(vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
quantkit.quantize_streaming(source, config, out, calibration=calibration, device="cpu")
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


class MemoryGroup:
    """A cgroup v1 memory group limited to ``limit`` bytes (swap included), removed on exit."""

    def __init__(self, name: str, limit: int):
        self.path = CGROUP_ROOT / name
        self.limit = limit

    def __enter__(self) -> MemoryGroup:
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        (self.path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
        (self.path / "memory.max_usage_in_bytes").write_text("0")
        return self

    def __exit__(self, *exc_info) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def join(self) -> None:
        """Put the calling process into the group (a child's ``preexec_fn``)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stat(self, key: str) -> int:
        for line in (self.path / "memory.stat").read_text().splitlines():
            name, value = line.split()
            if name == key:
                return int(value)
        raise KeyError(key)

    def read(self, name: str) -> int:
        return int((self.path / name).read_text())


@contextlib.contextmanager
def sampled(read, seconds: float = SAMPLE_SECONDS) -> Iterator[list[int]]:
    """Keep the largest value of ``read()`` in the yielded one-item list while the block runs."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(seconds):
            with contextlib.suppress(OSError, KeyError):
                peak[0] = max(peak[0], read())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


PREDICT = r"""
import json, sys, quantkit
source, config, nsamples, seqlen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = quantkit.as_config(config)
estimate = quantkit.estimate_quantization(source, config, nsamples=nsamples, seqlen=seqlen, streaming=True)
print(json.dumps([estimate.peak_bytes, estimate.seconds]))
"""
RUN_ENV = {**os.environ, "QUANTKIT_QUIET": "1", "OMP_WAIT_POLICY": "PASSIVE"}
"""The environment of the runs and of the predictions made for them."""


def predicted(source: Path, config: str, nsamples: int, seqlen: int) -> tuple[float, float]:
    """The estimator's peak bytes and seconds for streaming ``config`` from ``source``, predicted in
    a fresh process with the runs' environment (the rates it measures are those the run will meet)."""
    command = [sys.executable, "-c", PREDICT, str(source), config, str(nsamples), str(seqlen)]
    done = subprocess.run(command, env=RUN_ENV, capture_output=True, text=True, check=True)
    peak, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    return peak, seconds


def stored_rows(store: Path) -> dict[str, dict]:
    """The measured rows kept in ``store``, by config."""
    return {row["config"]: row for row in (json.loads(store.read_text()) if store.is_file() else [])}


def calibrated(config: str) -> bool:
    resolved = as_config(config)
    return get_registry().backend_for(resolved, Hardware.CPU).needs_calibration(resolved)


def measure(source: Path, config: str, out: Path, args: argparse.Namespace) -> dict:
    """Stream ``config`` from ``source`` into ``out`` in a child process inside a memory group."""
    predicted_peak, seconds = predicted(source, config, args.nsamples, args.seqlen)  # before the run, at its load
    drop_page_cache()
    command = [sys.executable, "-c", CHILD, str(source), config, str(out), str(args.nsamples), str(args.seqlen)]
    load = load_average()
    with MemoryGroup(f"quantkit-scale-{os.getpid()}", int(args.limit_gib * GIB)) as group:
        start = time.perf_counter()
        with sampled(lambda: group.stat("rss")) as anonymous:
            done = subprocess.run(command, env=RUN_ENV, preexec_fn=group.join, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak, hits = group.read("memory.max_usage_in_bytes"), group.read("memory.failcnt")
    row = {
        "config": config,
        "limit_gib": args.limit_gib,
        "calibrated": calibrated(config),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "exit": done.returncode,
        "process_seconds": wall,
        "cgroup_peak": peak,
        "limit_hits": hits,
        "anonymous_peak": anonymous[0],
        "load_before": load,
        "load_after": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "predicted_peak": predicted_peak,
        "predicted_seconds": seconds,
    }
    if done.returncode:
        row["seconds"] = wall
        row["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "(no message)"
    else:
        row["seconds"] = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        row["output_bytes"] = out.stat().st_size if out.is_file() else stored_bytes(out, ())["size_bytes"]
    return row


def render(log: RunLog, source: Path, rows: list[dict]) -> None:
    """Every measured row beside the estimator's prediction for it."""
    for row in rows:
        status = "completed" if row["exit"] == 0 else f"FAILED (exit {row['exit']}: {row.get('error')})"
        calibration = f"; calibration {row['nsamples']} x {row['seqlen']} tokens" if row["calibrated"] else ""
        log.emit(f"-- {row['config']} in a {row['limit_gib']:.2f} GiB cgroup{calibration}, {row['date']}")
        process = f", the process {row['process_seconds']:.1f} s" if "process_seconds" in row else ""
        log.emit(
            f"   {status} in {row['seconds']:.1f} s{process} (load before {row['load_before']}, "
            f"after {row['load_after']}); "
            f"cgroup peak {row['cgroup_peak'] / GIB:.2f} GiB (page cache included; memory.failcnt "
            f"{row['limit_hits']}), peak anonymous {row['anonymous_peak'] / GIB:.2f} GiB"
        )
        if row["exit"] == 0:
            log.emit(f"   output {row['output_bytes'] / GIB:.2f} GiB")
        when = "before the run"
        if "predicted_peak" in row:
            peak, seconds = row["predicted_peak"], row["predicted_seconds"]
        else:  # a row measured before predictions were kept with it
            peak, seconds = predicted(source, row["config"], row["nsamples"], row["seqlen"])
            when = f"now, at load {load_average()}"
        log.emit(
            f"   estimate ({when}): peak {peak / GIB:.2f} GiB ({peak / row['anonymous_peak']:.2f}x the anonymous "
            f"peak), time {seconds:.0f} s ({seconds / row['seconds']:.2f}x the measured)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="Llama-3.2-1B")
    parser.add_argument("--configs", default="rtn-4bit-g128", help="comma-separated presets or quant_methods")
    parser.add_argument("--limit-gib", type=float, default=3.0, help="the cgroup's memory limit, swap included")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration samples of calibrated methods")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantkit-scale"), help="folder for the checkpoints")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite the results of earlier runs")
    args = parser.parse_args()
    log = RunLog("scale.py")
    source = args.work / args.preset
    if not source.is_dir():
        start = time.perf_counter()
        script = Path(__file__).with_name("synthetic_checkpoint.py")
        subprocess.run([sys.executable, str(script), args.preset, str(source)], check=True)
        log.emit(f"synthetic checkpoint written in {time.perf_counter() - start:.1f} s (child process)")
    log.emit(f"{args.preset}: bf16 checkpoint {stored_bytes(source, ())['size_bytes'] / GIB:.2f} GiB at {source}")
    store = RESULTS / f"scale_{args.preset}.json"
    if not args.render:
        for config in args.configs.split(","):
            suffix = ".gguf" if as_config(config).quant_method == "gguf" else ""  # llama.cpp's file, written as it goes
            row = measure(source, config, args.work / f"{args.preset}-{config}{suffix}", args)
            rows = {**stored_rows(store), config: row}  # read again: another run may have added rows meanwhile
            store.write_text(json.dumps(list(rows.values()), indent=1) + "\n")
    render(log, source, list(stored_rows(store).values()))
    log.write(RESULTS / f"scale_{args.preset}.txt")


if __name__ == "__main__":
    main()
