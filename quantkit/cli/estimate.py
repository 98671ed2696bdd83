"""``quantkit estimate``: predicted model size per method, and with ``--time`` the time and
peak memory of quantizing it on this machine (``--stream``: streamed from the checkpoint folder),
with the flags that would lower that peak."""

from __future__ import annotations

import argparse
import dataclasses
import json

from rich.console import Console
from rich.table import Table

from ..builtin_backends.bnb.config import BnbConfig
from ..core.config import QuantConfig
from ..core.errors import ConfigValueError
from ..core.registry import get_registry
from ..core.resolve import preset
from ..estimate import QuantizeEstimate, estimate, estimate_quantization, format_seconds, measure_rates, stored_model
from ..memory_budget import format_gib
from ..models import default_model_folder
from .options import parse_overrides

FLOAT_METHODS = ("fp32", "fp16", "bf16")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Exact bits per parameter from each format's layout, for a parameter count or a config.json "
        "(default: the embedded SmolLM2-135M's); --time adds the time and peak memory of quantizing."
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--params", help="parameter count: 7B, 135M, 13e9 ...")
    source.add_argument(
        "--model-config", help="a model's config.json, its folder, or a hub id (only its config and headers are read)"
    )
    parser.add_argument("--method", action="append", help="preset or quant_method (repeatable); fp32/fp16/bf16 too")
    parser.add_argument("--double-quant", action="store_true", help="bitsandbytes double quantization")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--time", action="store_true", help="predict the time and peak memory of quantizing here (needs the shapes)"
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="with --time: the peak of quantize --stream (one module or decoder layer at a time, weights in their "
        "stored dtype)",
    )
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    if args.time and args.params:
        raise ConfigValueError("estimate", "--time", f"with --params {args.params}", "--model-config (or neither)")
    if args.params is None and args.model_config is None:
        args.model_config = default_model_folder()
    rates = measure_rates(disk=args.stream) if args.time else None
    shapes = None
    if args.time:  # built once: the architecture on the meta device, in memory as loaded (float32) or as stored
        shapes = stored_model(args.model_config)
        shapes = shapes if args.stream else shapes.float()
    rows = []
    for method in args.method or ["fp32", "fp16", "int8", "nf4", "nf4-dq", "gptq-4bit-g128", "awq-4bit-g128"]:
        if method in FLOAT_METHODS:
            dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[method]
            rows.append(
                {"method": method, **estimate(args.params, None, model_config=args.model_config, dtype=dtype).to_dict()}
            )
            continue
        config = preset(method, overrides)
        if args.double_quant and isinstance(config, BnbConfig) and config.load_in_4bit:
            config = dataclasses.replace(config, use_double_quant=True)
        rows.append({"method": method, **estimate(args.params, config, model_config=args.model_config).to_dict()})
        if args.time:
            timing = estimate_quantization(shapes, config, rates=rates, streaming=args.stream)
            lower = _lower_peaks(shapes, config, timing, args.model_config)
            rows[-1].update(seconds=timing.seconds, peak_gib=timing.peak_bytes / 2**30, lower_peak_gib=lower)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"estimated size ({args.params or args.model_config})")
    timed = ("quantize time", "peak GiB", "lower peak with") if args.time else ()
    for column in ("method", "bits/param", "GB", "GiB", *timed):
        table.add_column(column, justify="right")
    for r in rows:
        timing = ("-", "-", "")
        if "seconds" in r:
            lower = "; ".join(f"{flag}: {gib:.2f}" for flag, gib in r["lower_peak_gib"].items())
            timing = (format_seconds(r["seconds"]), f"{r['peak_gib']:.2f}", lower or "-")
        sizes = (f"{r['bits_per_param']:.3f}", f"{r['total_gb']:.2f}", f"{r['total_gib']:.2f}")
        table.add_row(r["method"], *sizes, *(timing if args.time else ()))
    if rates is not None:
        table.caption = (
            f"quantize times at {rates.flops / 1e9:.0f} GFLOP/s, measured here on {rates.device}; peaks "
            + ("streamed (quantize --stream), weights in their stored dtype" if args.stream else "in memory (float32)")
            + "; --max-memory spills calibration activations to disk"
        )
    Console().print(table)
    return 0


def _lower_peaks(shapes, config: QuantConfig, timing: QuantizeEstimate, source) -> dict[str, float]:
    """The flags of ``quantkit quantize`` that lower the peak ``timing`` predicts, with the peak (GiB)
    each gives: ``--stream``, a ``--max-memory`` that spills the calibration activations to disk,
    half the calibration samples."""
    lower: dict[str, int] = {}
    backend = get_registry().backends_for_method(config.quant_method)[0]
    calibrated = backend.needs_calibration(config)
    if not timing.streaming and (backend.streams_layers if calibrated else backend.streams_modules):
        lower["--stream"] = estimate_quantization(stored_model(source), config, streaming=True).peak_bytes
    spilled = estimate_quantization(shapes, config, streaming=timing.streaming, spill=True)
    if spilled.spill:
        lower[f"--max-memory {format_gib(spilled.peak_bytes)}"] = spilled.peak_bytes
    if timing.calibration and timing.calibration[0] > 1:
        nsamples, seqlen = timing.calibration[0] // 2, timing.calibration[1]
        half = estimate_quantization(shapes, config, nsamples=nsamples, seqlen=seqlen, streaming=timing.streaming)
        lower[f"--set nsamples={nsamples}"] = half.peak_bytes
    return {flag: size / 2**30 for flag, size in lower.items() if size < timing.peak_bytes}
