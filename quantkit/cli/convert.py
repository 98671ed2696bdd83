"""``quantkit convert``: a quantized checkpoint in another format (GPTQ, AWQ, compressed-tensors)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ..formats.checkpoints import FORMATS
from ..formats.convert import convert


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert a saved GPTQ, AWQ, round-to-nearest or compressed-tensors checkpoint into another format. "
        "Every weight keeps its exact value; a layer the target cannot hold exactly is refused with the reason "
        "unless --allow-lossy, which re-quantizes it by round-to-nearest."
    )
    parser.add_argument("src", type=Path, help="the quantized checkpoint folder")
    parser.add_argument("dst", type=Path, help="the output folder")
    parser.add_argument("--to", required=True, metavar="FORMAT", help=f"one of: {', '.join(FORMATS)}")
    parser.add_argument("--allow-lossy", action="store_true", help="re-quantize layers the target cannot hold exactly")


def run(args: argparse.Namespace) -> int:
    convert(args.src, args.dst, to=args.to, allow_lossy=args.allow_lossy)
    Console(stderr=True).print(f"saved {args.dst} ({args.to})", highlight=False)
    return 0
