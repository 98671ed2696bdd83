"""AQLM on SmolLM2-135M: perplexity, stored bits per weight, time, peak RSS and FLOP count.

    python benchmarks/aqlm_quality.py                          # aqlm-2x8 preset (the 30-minute budget)
    python benchmarks/aqlm_quality.py --preset aqlm-1x16
    python benchmarks/aqlm_quality.py --paper                  # the paper's settings (hours on 2 cores)
    python benchmarks/aqlm_quality.py --set beam_size=4 --set rounds=2

It follows ``quantkit compare``'s protocol (pydoc text: 16 x 512 calibration tokens, 4096
evaluation tokens in windows of 512, 2 threads), prints the float model's perplexity next to
the quantized one, the FLOP count of each phase of the algorithm (:func:`aq_flops`, summed over
the model's linears) and the measured time. Peak RSS is sampled every 50 ms by a thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import psutil
import torch
from calibration_speed import PeakRSS  # this folder's scripts import each other when run

import quantkit
from quantkit.builtin_backends.aqlm.aq import aq_flops
from quantkit.builtin_backends.aqlm.config import AQLMConfig
from quantkit.builtin_backends.aqlm.qlinear import AQLMLinear
from quantkit.calibration import calibration_tokens, evaluation_tokens
from quantkit.compare import run_header
from quantkit.compare.protocol import Protocol
from quantkit.core.resolve import as_config
from quantkit.evaluate import evaluate
from quantkit.models import load_model


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="aqlm-2x8")
    parser.add_argument("--paper", action="store_true", help="the paper's calibration settings (the config defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    parser.add_argument("--flops-only", action="store_true", help="print the FLOP count and stop")
    args = parser.parse_args()
    protocol = Protocol()
    torch.set_num_threads(protocol.threads)
    config = as_config(args.preset)
    if args.paper:
        defaults = AQLMConfig()
        calibration = ("beam_size", "rounds", "codebook_steps", "codebook_lr", "kmeans_iters")
        config = dataclasses.replace(
            config, **{f: getattr(defaults, f) for f in calibration}, kmeans_points_per_centroid=None, nsamples=128
        )
    overrides = dict(item.split("=", 1) for item in args.set)
    config = dataclasses.replace(config, **{k: parse_value(v) for k, v in overrides.items()})
    print(run_header())
    print(f"config: {json.dumps(config.to_diff_dict())}")

    model, tokenizer = load_model()
    calibration = calibration_tokens(tokenizer, protocol.dataset, nsamples=config.nsamples, seqlen=config.seqlen)
    tokens = calibration.numel()
    flops: dict[str, float] = {}
    for name, linear in model.named_modules():
        if isinstance(linear, torch.nn.Linear) and not config.skips(name):
            for phase, count in aq_flops(config, linear.out_features, linear.in_features, tokens).items():
                flops[phase] = flops.get(phase, 0.0) + count
    print(f"FLOPs ({tokens} calibration tokens): " + ", ".join(f"{k} {v / 1e12:.2f} T" for k, v in flops.items()))
    print(f"FLOPs total: {sum(flops.values()) / 1e12:.2f} T")
    if args.flops_only:
        return

    eval_ids = evaluation_tokens(tokenizer, protocol.dataset, max_tokens=protocol.eval_tokens)
    baseline = evaluate(model, eval_ids, seqlen=protocol.seqlen, stride=protocol.stride).perplexity
    print(f"float perplexity: {baseline:.3f}", flush=True)

    start = time.perf_counter()
    with PeakRSS() as rss:
        quantized = quantkit.quantize(model, config, calibration=calibration, device="cpu")
    seconds = time.perf_counter() - start
    layers = [m for m in quantized.modules() if isinstance(m, AQLMLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    stored = sum(t.numel() * t.element_size() * 8 for m in layers for n, t in m.named_parameters() if n != "bias")
    result = evaluate(quantized, eval_ids, seqlen=protocol.seqlen, stride=protocol.stride)
    print(
        f"{args.preset}{' (paper settings)' if args.paper else ''}: perplexity {result.perplexity:.3f} "
        f"(float {baseline:.3f}); {stored / weights:.3f} stored bits per quantized weight "
        f"({config.code_bits:g} of codes); quantize {seconds:.0f} s "
        f"({sum(flops.values()) / seconds / 1e9:.1f} GFLOP/s); peak RSS {rss.peak / 2**20:.0f} MiB; "
        f"load average {psutil.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
