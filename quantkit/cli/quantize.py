"""``quantkit quantize``: quantize a model and save it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console

from ..api import quantize, save
from ..core.errors import ConfigValueError
from ..models import load_model
from ..streaming import quantize_streaming
from .options import add_config_options, config_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Quantize a model (hub id, folder or .gguf; default: the embedded SmolLM2-135M) and save it."
    parser.add_argument("--model", help="hub id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    add_config_options(parser)
    parser.add_argument("--calibration", help="calibration dataset name or text file (methods that calibrate)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best present)")
    parser.add_argument("--out", type=Path, required=True, help="output folder, or a file such as model.gguf")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="read --model (a local float checkpoint folder) one module at a time and write the output as it goes: "
        "models larger than memory, calibration-free methods (rtn, eetq)",
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.stream and not (args.model and Path(args.model).is_dir()):
        raise ConfigValueError("quantize", "--model", args.model, "a local float checkpoint folder (with --stream)")
    console = Console(stderr=True)
    console.print(f"config: {config.to_diff_dict()}", highlight=False)
    # quantkit's INFO lines are this command's report: the predicted time and memory before
    # quantizing, the time it took after (and a first conversion of the default model)
    logger = logging.getLogger("quantkit")
    level = logger.level
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    try:
        if args.stream:
            quantize_streaming(args.model, config, args.out, device=args.device)
        else:
            model, tokenizer = load_model(args.model)
            model = quantize(model, config, calibration=args.calibration, device=args.device, tokenizer=tokenizer)
    finally:
        logger.setLevel(level)
    if not args.stream:
        save(model, args.out, tokenizer=tokenizer)
    console.print(f"saved {args.out}", highlight=False)
    return 0
