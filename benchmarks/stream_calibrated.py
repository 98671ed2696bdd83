"""A calibrated method streamed from disk against the same method in memory, on a real checkpoint:
are the outputs the same bytes, and what do the two runs cost?

    .venv/bin/python benchmarks/stream_calibrated.py                       # SmolLM2-135M, GPTQ 4-bit
    .venv/bin/python benchmarks/stream_calibrated.py --method awq-4bit-g64 --set nsamples=32

Runs ``quantkit quantize`` twice in child processes under ``/usr/bin/time -v``: once in memory
(the whole float model loaded), once with ``--stream`` (one decoder layer at a time), with the same
method, ``--set`` overrides and default calibration text. Reported: wall time, peak RSS (``ru_maxrss``:
the streamed run's includes the clean pages of the memory-mapped shards, which the kernel reclaims
under pressure) and peak anonymous memory (``RssAnon`` sampled every 50 ms: what the process itself
holds) of each, then the outputs compared tensor by tensor (name, dtype, shape,
bytes), ``config.json`` as JSON and every other file byte for byte. The machine may be shared: the
load average is printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from run_log import load_average  # this folder's scripts import each other when run
from safetensors.torch import load_file

from quantkit.models import default_model_folder

SAMPLE_SECONDS = 0.05


def timed(command: list[str]) -> tuple[float, int, int]:
    """Run ``command`` under ``/usr/bin/time -v``: its wall seconds, peak RSS and peak anonymous
    memory (``RssAnon`` of the command's process, sampled every :data:`SAMPLE_SECONDS`), in bytes."""
    print("$ " + " ".join(command), flush=True)
    process = subprocess.Popen(["/usr/bin/time", "-v", *command], stderr=subprocess.PIPE, text=True)
    anonymous = 0
    while process.poll() is None:
        for child in psutil.Process(process.pid).children():
            with contextlib.suppress(OSError, AttributeError):
                status = Path(f"/proc/{child.pid}/status").read_text()
                anonymous = max(anonymous, int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024)
        time.sleep(SAMPLE_SECONDS)
    stderr = process.stderr.read()
    if process.returncode:
        sys.exit(f"failed ({process.returncode}):\n{stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", stderr)
    hours, minutes, seconds = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1)) * 1024
    return hours * 3600 + minutes * 60 + seconds, rss, anonymous


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def compare(memory: Path, streamed: Path) -> None:
    expected, got = tensors_of(memory), tensors_of(streamed)
    differ = [name for name in expected if name in got and not same_bytes(expected[name], got[name])]
    print(
        f"tensors: {len(expected)} in memory, {len(got)} streamed; names equal: {expected.keys() == got.keys()}; "
        f"{len(differ)} differ in dtype, shape or bytes{': ' + ', '.join(differ[:5]) if differ else ''}"
    )
    configs = [json.loads((folder / "config.json").read_text()) for folder in (memory, streamed)]
    print(f"config.json equal as JSON: {configs[0] == configs[1]}")
    for name in sorted({p.name for p in memory.iterdir()} | {p.name for p in streamed.iterdir()}):
        print(f"  {name}: {file_state(memory / name, streamed / name)}")


def file_state(a: Path, b: Path) -> str:
    if not (a.is_file() and b.is_file()):
        return "only in the in-memory output" if a.is_file() else "only in the streamed output"
    return "identical bytes" if a.read_bytes() == b.read_bytes() else "differs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="float checkpoint folder (default: the cached SmolLM2-135M)")
    parser.add_argument("--method", default="gptq", help="preset or quant_method (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantkit-stream-calibrated"))
    args = parser.parse_args()
    model = args.model or default_model_folder()
    print(f"command: {' '.join(sys.argv)}")
    print(f"load average before: {load_average()}; model {model}")
    shutil.rmtree(args.work, ignore_errors=True)
    base = [sys.executable, "-m", "quantkit", "quantize", "--model", str(model), "--method", args.method]
    base += [item for pair in args.set for item in ("--set", pair)]
    for name, extra in (("memory", []), ("streamed", ["--stream"])):
        wall, rss, anonymous = timed([*base, *extra, "--out", str(args.work / name)])
        print(f"{name}: {wall:.1f} s wall, peak RSS {rss / 2**20:.0f} MiB, peak anonymous {anonymous / 2**20:.0f} MiB")
    compare(args.work / "memory", args.work / "streamed")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
