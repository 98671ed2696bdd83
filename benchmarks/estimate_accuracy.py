"""The time and memory prediction (``quantkit.estimate_quantization``) against measured runs.

    python benchmarks/estimate_accuracy.py                      # every case
    python benchmarks/estimate_accuracy.py --cases tiny-gptq    # one case

Each case runs in a fresh Python process on one thread, so its peak RSS is its own (a long-lived
process keeps freed memory and earlier allocations) and no descheduled second thread skews a time.
The prediction uses rates measured in the same process just before the run. A row gives the
predicted and measured seconds and peak RSS, and their ratios; the targets are a time within 2x
and a peak within 30 %. The machine may be shared: the load average is printed with the results.

The streamed case (``llama1b-rtn-streamed``) runs ``quantkit.quantize_streaming`` from a bfloat16
checkpoint with Llama-3.2-1B's shapes (2 of its 16 decoder layers: every module at full size),
written beforehand by the parent process into a temporary folder, against
``estimate_quantization(..., streaming=True)``; its measured peak is the process's anonymous
memory (``RssAnon``, sampled every 20 ms), which is what the estimator counts: the shards' mapped
pages are page cache the kernel reclaims.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import quantkit
from quantkit.calibration import calibration_tokens
from quantkit.estimate import estimate_quantization, measure_rates
from quantkit.models import load_model
from quantkit.testing import tiny_llama
from quantkit.testing.synthetic_checkpoints import write_synthetic_checkpoint

CASES = {
    "tiny-gptq": "GPTQ g64 on a 2-layer 256-wide Llama, 8 x 128 random tokens",
    "smollm2-gptq": "GPTQ 4-bit g128 on SmolLM2-135M, 4 x 512 calibration tokens",
    "smollm2-awq": "AWQ 4-bit g64 on SmolLM2-135M, 4 x 512 calibration tokens",
    "llama1b-rtn-streamed": "RTN 4-bit g128 streamed from Llama-3.2-1B's shapes (2 layers, bf16); peak: RssAnon",
}
STREAMED = {"llama1b-rtn-streamed": ("Llama-3.2-1B", 2, "rtn-4bit-g128")}
"""Streamed cases: the preset, decoder layers kept and config."""
SAMPLE_SECONDS = 0.02


def anonymous_bytes() -> int:
    """This process's anonymous resident memory (``RssAnon`` of ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def run_streamed(name: str, folder: Path) -> dict:
    """Predict, then stream the checkpoint in ``folder``, sampling the anonymous memory meanwhile."""
    torch.set_num_threads(1)
    config = quantkit.as_config(STREAMED[name][2])
    prediction = estimate_quantization(folder, config, streaming=True, rates=measure_rates("cpu", disk=True))
    peak, done = [anonymous_bytes()], threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            peak[0] = max(peak[0], anonymous_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder.parent) as out:
        quantkit.quantize_streaming(folder, config, Path(out) / "quantized", device="cpu")
        seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {
        "case": name,
        "predicted_s": prediction.seconds,
        "measured_s": seconds,
        "predicted_peak_bytes": prediction.peak_bytes,
        "measured_peak_bytes": max(peak[0], anonymous_bytes()),
    }


def run_case(name: str) -> dict:
    """Predict, then quantize, in this process; return both."""
    torch.set_num_threads(1)
    if name == "tiny-gptq":
        model = tiny_llama(hidden=256, layers=2, intermediate=512, vocab=512, outliers=False)
        config = quantkit.GPTQConfig(group_size=64)
        tokens = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(0))
    else:
        model, tokenizer = load_model()
        config = (
            quantkit.GPTQConfig(bits=4, group_size=128, nsamples=4)
            if name == "smollm2-gptq"
            else quantkit.AWQConfig(bits=4, group_size=64, nsamples=4)
        )
        tokens = calibration_tokens(tokenizer, nsamples=4, seqlen=512)
    prediction = estimate_quantization(
        model, config, nsamples=tokens.shape[0], seqlen=tokens.shape[1], rates=measure_rates("cpu")
    )
    start = time.perf_counter()
    model = quantkit.quantize(model, config, calibration=tokens, device="cpu")
    seconds = time.perf_counter() - start
    return {
        "case": name,
        "predicted_s": prediction.seconds,
        "measured_s": seconds,
        "predicted_peak_bytes": prediction.peak_bytes,
        "measured_peak_bytes": model.quantkit_calibration_report.peak_rss_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: run one case, print JSON
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)  # its checkpoint, for a streamed case
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_streamed(args.one, args.checkpoint) if args.checkpoint else run_case(args.one)))
        return
    print(f"# {' '.join(['python', *sys.argv])}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    header = f"{'case':<20} {'pred s':>8} {'meas s':>8} {'ratio':>6} {'pred GiB':>9} {'peak GiB':>9} {'ratio':>6}"
    print(header)
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"--cases: unknown case {name!r}; choose from {', '.join(CASES)}")
        with tempfile.TemporaryDirectory() as work:
            command = [sys.executable, __file__, "--one", name]
            if name in STREAMED:
                preset, layers, _ = STREAMED[name]
                folder = write_synthetic_checkpoint(Path(work) / "float", preset, layers=layers)
                command += ["--checkpoint", str(folder)]
            load = os.getloadavg()[0]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"{name:<20} {row['predicted_s']:8.1f} {row['measured_s']:8.1f} "
            f"{row['predicted_s'] / row['measured_s']:6.2f} {row['predicted_peak_bytes'] / 2**30:9.2f} "
            f"{row['measured_peak_bytes'] / 2**30:9.2f} {row['predicted_peak_bytes'] / row['measured_peak_bytes']:6.2f}"
            f"   (load {load:.1f}; {CASES[name]})"
        )


if __name__ == "__main__":
    main()
