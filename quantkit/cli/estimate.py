"""``quantkit estimate``: predicted model size per method."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .options import parse_overrides

FLOAT_METHODS = ("fp32", "fp16", "bf16")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate", help="predict the stored size of a quantized model",
        description="Exact bits per parameter from each format's layout, for a parameter count or a config.json.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help="parameter count: 7B, 135M, 13e9 ...")
    source.add_argument("--model-config", type=Path, help="a model's config.json (or its folder)")
    parser.add_argument("--method", action="append", help="preset or quant_method (repeatable); fp32/fp16/bf16 too")
    parser.add_argument("--double-quant", action="store_true", help="bitsandbytes double quantization")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantkit.estimate import estimate
    from quantkit.core.resolve import preset

    import dataclasses

    from quantkit.builtin_backends.bnb.config import BnbConfig

    overrides = parse_overrides(args.overrides)
    rows = []
    for method in args.method or ["fp32", "fp16", "int8", "nf4", "nf4-dq", "gptq-4bit-g128", "awq-4bit-g128"]:
        if method in FLOAT_METHODS:
            dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[method]
            result = estimate(args.params, None, model_config=args.model_config, dtype=dtype)
        else:
            config = preset(method, overrides)
            if args.double_quant and isinstance(config, BnbConfig) and config.load_in_4bit:
                config = dataclasses.replace(config, use_double_quant=True)
            result = estimate(args.params, config, model_config=args.model_config)
        rows.append({"method": method, **result.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"estimated size ({args.params or args.model_config})")
    for column in ("method", "bits/param", "GB", "GiB"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["method"], f"{r['bits_per_param']:.3f}", f"{r['total_gb']:.2f}", f"{r['total_gib']:.2f}")
    Console().print(table)
    return 0
