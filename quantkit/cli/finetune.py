"""``quantkit finetune``: a short LoRA fine-tune of a quantized model (QLoRA with ``--method qlora``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

from .. import finetune as ft
from ..core.atomic import atomic_path
from ..core.config import QuantConfig
from ..core.errors import ConfigValueError
from ..core.hardware import resolve_device
from ..models import load_model
from .options import add_config_options, config_from_args

SHORT_FORMS = {
    "qlora": "4-bit NF4 + double quantization, bfloat16 compute where native (else float32)",
    "float": "no quantization: LoRA on the float model (the baseline)",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Quantize a model, train LoRA adapters on a text for a few steps, and write the adapter "
        "(safetensors), the loss curve (loss.png) and metrics.json into --out. "
        f"Besides presets, --method takes {', '.join(f'{k!r} ({v})' for k, v in SHORT_FORMS.items())}."
    )
    parser.add_argument("--model", help="hub id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    add_config_options(parser)
    parser.add_argument("--text", help="text file or dataset name to train on (default: the built-in pydoc text)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (default: 2)")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per sequence (default: 128)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default: 16)")
    parser.add_argument("--alpha", type=float, default=8, help="LoRA alpha (default: 8)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    parser.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module names to adapt (default: all-linear, every linear but the output head)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best present)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    quantize = _quantization(args, device)
    targets = args.target_modules if args.target_modules == ft.ALL_LINEAR else args.target_modules.split(",")
    lora = {"r": args.rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout, "target_modules": targets}
    console = Console(stderr=True)
    console.print(f"quantization: {quantize.to_diff_dict() if quantize else 'none (float)'}", highlight=False)
    model, tokenizer = load_model(args.model)
    result = ft.finetune(
        model,
        tokenizer,
        args.text,
        steps=args.steps,
        lora=lora,
        quantize=quantize,
        lr=args.lr,
        batch_size=args.batch_size,
        seqlen=args.seqlen,
        gradient_checkpointing=args.gradient_checkpointing,
        device=device,
        seed=args.seed,
    )
    base = result.model.get_base_model()
    metrics = {
        "losses": result.losses,
        "peak_rss_bytes": result.peak_rss_bytes,
        "seconds": result.seconds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seqlen": args.seqlen,
        "lr": args.lr,
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "text": args.text or "pydoc (built-in)",
        "backend": getattr(base, "quantkit_backend", None),
        "quantization": quantize.to_dict() if quantize else None,
        "lora": {k: v if isinstance(v, (int, float, str)) else sorted(v) for k, v in lora.items()},
        "trainable_parameters": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
    }
    with atomic_path(args.out, directory=True) as tmp:
        result.model.save_pretrained(tmp, safe_serialization=True)
        plot_losses(result.losses, tmp / "loss.png", title=f"LoRA fine-tune ({metrics['backend'] or 'float'})")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    console.print(
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.seconds:.1f} s, "
        f"peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB; wrote {args.out}",
        highlight=False,
    )
    return 0


def _quantization(args: argparse.Namespace, device: torch.device) -> QuantConfig | None:
    if args.method in SHORT_FORMS:
        if args.overrides:
            raise ConfigValueError("--set", "KEY=VALUE", args.overrides, f"none with --method {args.method}")
        return ft.qlora_config(True, device) if args.method == "qlora" else None
    return config_from_args(args)


def plot_losses(losses: list[float], path: Path, *, title: str) -> None:
    """The per-step training loss as a PNG (matplotlib's Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(range(1, len(losses) + 1), losses, marker="." if len(losses) < 50 else None)
    axes.set(xlabel="step", ylabel="training loss", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
