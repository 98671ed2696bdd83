"""The time and memory prediction (``quantkit.estimate_quantization``) against measured runs.

    python benchmarks/estimate_accuracy.py                      # every case
    python benchmarks/estimate_accuracy.py --cases tiny-gptq    # one case

Each case runs in a fresh Python process on one thread, so its peak RSS is its own (a long-lived
process keeps freed memory and earlier allocations) and no descheduled second thread skews a time.
The prediction uses rates measured in the same process just before the run. A row gives the
predicted and measured seconds and peak RSS, and their ratios; the targets are a time within 2x
and a peak within 30 %. The machine may be shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

import quantkit
from quantkit.calibration import calibration_tokens
from quantkit.estimate import estimate_quantization, measure_rates
from quantkit.models import load_model
from quantkit.testing import tiny_llama

CASES = {
    "tiny-gptq": "GPTQ g64 on a 2-layer 256-wide Llama, 8 x 128 random tokens",
    "smollm2-gptq": "GPTQ 4-bit g128 on SmolLM2-135M, 4 x 512 calibration tokens",
    "smollm2-awq": "AWQ 4-bit g64 on SmolLM2-135M, 4 x 512 calibration tokens",
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
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one)))
        return
    print(f"# {' '.join(['python', *sys.argv])}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    header = f"{'case':<14} {'pred s':>8} {'meas s':>8} {'ratio':>6} {'pred GiB':>9} {'peak GiB':>9} {'ratio':>6}"
    print(header)
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"--cases: unknown case {name!r}; choose from {', '.join(CASES)}")
        load = os.getloadavg()[0]
        child = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"{name:<14} {row['predicted_s']:8.1f} {row['measured_s']:8.1f} "
            f"{row['predicted_s'] / row['measured_s']:6.2f} {row['predicted_peak_bytes'] / 2**30:9.2f} "
            f"{row['measured_peak_bytes'] / 2**30:9.2f} {row['predicted_peak_bytes'] / row['measured_peak_bytes']:6.2f}"
            f"   (load {load:.1f}; {CASES[name]})"
        )


if __name__ == "__main__":
    main()
