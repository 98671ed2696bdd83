"""``quantkit quantize``: quantize a model and save it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console

from ..api import quantize, save
from ..autobits import check_method, choose_mixed_precision
from ..core.atomic import atomic_path
from ..core.config import QuantConfig
from ..core.errors import ConfigValueError
from ..distributed import session
from ..memory_budget import parse_bytes
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
        help="read --model (a local float checkpoint folder or llama .gguf) one module at a time and write the output "
        "as it goes: models larger than memory (rtn, eetq, hqq, bitsandbytes, gguf; gptq, awq one decoder layer "
        "at a time)",
    )
    parser.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget (4GB, 3GiB, 2.5G): plan the run under it, spilling calibration activations to disk "
        "when needed, or fail at once naming the smallest budget that would work",
    )
    parser.add_argument(
        "--target-bits",
        type=float,
        metavar="B",
        help="choose each linear's setting (gguf: ggml type; gptq, rtn: bits and group size) for the least "
        "predicted KL at no more than B stored bits per parameter, measured on --calibration text; the "
        "chosen config is saved as JSON (--config-out) and reruns with --config",
    )
    parser.add_argument(
        "--config-out", type=Path, help="where --target-bits saves the chosen config (default: OUT.config.json)"
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    max_memory = None if args.max_memory is None else parse_bytes(args.max_memory, "--max-memory")
    if args.stream and not (args.model and (Path(args.model).is_dir() or Path(args.model).is_file())):
        raise ConfigValueError(
            "quantize", "--model", args.model, "a local float checkpoint folder or .gguf file (with --stream)"
        )
    if args.target_bits is not None:
        if args.stream:
            raise ConfigValueError("quantize", "--target-bits", args.target_bits, "a run without --stream")
        check_method(config)
    dist = session()  # under torchrun: join the process group; every rank calibrates, rank 0 writes
    if args.stream and dist.world > 1:
        raise ConfigValueError("quantize", "--stream", True, "one process (launch a streamed run without torchrun)")
    if args.target_bits is not None and dist.world > 1:  # each rank would measure every layer's sensitivity alone
        raise ConfigValueError(
            "quantize", "--target-bits", args.target_bits, "one process (choose with --config-out, then run torchrun)"
        )
    console = Console(stderr=True)
    console.print(f"config: {config.to_diff_dict()}", highlight=False)
    # quantkit's INFO lines are this command's report: the predicted time and memory before
    # quantizing, the time it took after (and a first conversion of the default model)
    logger = logging.getLogger("quantkit")
    level = logger.level
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    try:
        if args.stream:
            quantize_streaming(
                args.model, config, args.out, calibration=args.calibration, device=args.device, max_memory=max_memory
            )
        else:
            model, tokenizer = load_model(args.model)
            if args.target_bits is not None:
                config = _choose(model, tokenizer, config, args, console)
            model = quantize(
                model,
                config,
                calibration=args.calibration,
                device=args.device,
                tokenizer=tokenizer,
                max_memory=max_memory,
            )
    finally:
        logger.setLevel(level)
    if not args.stream:
        if dist.is_main:
            save(model, args.out, tokenizer=tokenizer)
        dist.barrier()  # the other ranks end once the output is written, or fail with rank 0
    if dist.is_main:
        console.print(f"saved {args.out}", highlight=False)
    return 0


def _choose(model, tokenizer, config: QuantConfig, args: argparse.Namespace, console: Console) -> QuantConfig:
    """The mixed-precision config for ``--target-bits``, saved as JSON."""
    config = choose_mixed_precision(model, config, args.target_bits, calibration=args.calibration, tokenizer=tokenizer)
    path = args.config_out or args.out.with_name(args.out.name + ".config.json")
    with atomic_path(path, directory=False) as tmp:
        tmp.write_text(config.to_json_string(diff=True), encoding="utf-8")
    console.print(
        f"chosen config ({len(config.module_overrides)} module overrides) saved to {path}; rerun it with "
        f"--config {path}",
        highlight=False,
    )
    return config
