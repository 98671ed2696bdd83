"""``quantkit imatrix``: collect a llama.cpp importance matrix from calibration text."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ..builtin_backends.gguf.imatrix import collect_imatrix
from ..builtin_backends.gguf.imatrix_files import FORMATS
from ..calibration import calibration_tokens
from ..core.hardware import resolve_device
from ..core.text import DEFAULT_DATASET
from ..models import load_model


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Collect an importance matrix (llama-imatrix's: mean squared input per column of every decoder "
        "linear, on the float model) and write it as a llama.cpp imatrix file, for "
        "`quantkit quantize --method gguf-q4_k_m --set imatrix=FILE` or llama-quantize --imatrix."
    )
    parser.add_argument("--model", help="hub id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="calibration dataset name or text file")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window, llama.cpp's chunk (default 512)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best present)")
    parser.add_argument("--format", choices=FORMATS, help="gguf or dat (legacy); default: from --out's suffix")
    parser.add_argument("--out", type=Path, required=True, help="output file, e.g. imatrix.gguf")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model)
    tokens = calibration_tokens(tokenizer, args.dataset, nsamples=args.nsamples, seqlen=args.seqlen)
    matrix = collect_imatrix(model, tokens, device=resolve_device(args.device), dataset=str(args.dataset))
    matrix.save(args.out, args.format)
    summary = f"{len(matrix.names())} entries, {tokens.shape[0]} x {tokens.shape[1]} tokens"
    Console(stderr=True).print(f"saved {args.out}: {summary}", highlight=False)
    return 0
