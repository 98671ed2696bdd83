"""``quantkit quantize``: quantize a model and save it."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from .options import add_config_options, config_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize", help="quantize a model and save it",
        description="Quantize a model (hub id, folder or .gguf; default: the embedded SmolLM2-135M) and save it.",
    )
    parser.add_argument("--model", help="hub id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    add_config_options(parser)
    parser.add_argument("--calibration", help="calibration dataset name or text file (methods that calibrate)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best present)")
    parser.add_argument("--out", type=Path, required=True, help="output folder, or a file such as model.gguf")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import quantkit
    from quantkit.models import load_model

    config = config_from_args(args)
    console = Console(stderr=True)
    console.print(f"config: {config.to_diff_dict()}", highlight=False)
    model, tokenizer = load_model(args.model)
    model = quantkit.quantize(model, config, calibration=args.calibration, device=args.device, tokenizer=tokenizer)
    quantkit.save(model, args.out, tokenizer=tokenizer)
    console.print(f"saved {args.out}", highlight=False)
    return 0
