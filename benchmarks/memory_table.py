"""The size estimator against measured sizes, and the 7B/13B/70B memory table.

    python benchmarks/memory_table.py                      # quantize the embedded model, then the seed table
    python benchmarks/memory_table.py --methods nf4,int8   # fewer methods
    python benchmarks/memory_table.py --from-results quantkit-compare/results.json
    python benchmarks/memory_table.py --seed-only

Part 1 quantizes the model with each method, saves it with ``quantkit.save`` and
compares the bytes of the saved quantized linears (and of the whole folder)
with ``quantkit.estimate``'s prediction. Calibrated methods get a small
calibration set: the stored layout does not depend on its size.

Part 2 predicts Llama-2 7B/13B/70B at FP32, FP16, 8-bit, 4-bit, 4-bit double
quant, GPTQ and AWQ 4-bit, twice: from the parameter count alone, and from the
real architecture (embeddings and output head stay in 16 bits), next to the
popular rounded figure (parameters x bits / 8: 28/14/7/3.5 GB for "7B").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantkit.compare import (
    Protocol,
    apply_method,
    method_from_name,
    model_config,
    quantized_linears,
    run_header,
    save_and_measure,
)
from quantkit.core.resolve import preset
from quantkit.estimate import estimate

MEASURED_METHODS = (
    "bf16",
    "int8",
    "nf4",
    "nf4-dq",
    "fp4",
    "rtn-4bit-g128",
    "gptq-4bit-g128",
    "awq-4bit-g128",
    "hqq-4bit-g64",
    "gguf-q8_0",
    "gguf-q4_k_m",
    "gguf-q2_k",
)

LLAMA2 = {
    "7B": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    ),
    "13B": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40
    ),
    "70B": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    ),
}
"""Llama-2's published architectures (vocabulary 32000, untied output head)."""

SEED_FORMATS = (
    ("FP32", None, "float32", 32),
    ("FP16", None, "float16", 16),
    ("8-bit (LLM.int8)", "int8", "float16", 8),
    ("4-bit (NF4)", "nf4", "float16", 4),
    ("4-bit + double quant", "nf4-dq", "float16", 4),
    ("GPTQ 4-bit g128", "gptq-4bit-g128", "float16", 4),
    ("AWQ 4-bit g128", "awq-4bit-g128", "float16", 4),
)
"""Row label, preset (``None``: unquantized), dtype of everything not quantized, nominal bits."""


def measured_rows(methods: list[str], model: str | None, threads: int) -> list[dict]:
    """Quantize, save and measure each method on a fresh copy of ``model``."""
    from quantkit.models import load_model

    protocol = Protocol(model=model, calibration_samples=8, calibration_seqlen=256, threads=threads)
    raw = model_config(model)
    rows = []
    for name in methods:
        method = method_from_name(name, protocol)
        row = {"method": name}
        try:
            est = estimate(config=method.config, model_config=raw, dtype=method.dtype)
            row.update(estimated_bits=est.bits_per_param, estimated_bytes=est.total_bytes)
            net, tokenizer = load_model(model)
            names, params = quantized_linears(net, method)
            net, _ = apply_method(net, tokenizer, method, protocol)
            stored = save_and_measure(net, method, names)
            row.update(bits=8 * stored["quantized_bytes"] / params, size_bytes=stored["size_bytes"])
        except Exception as exc:  # one method failing must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print(f"  {name}: {row.get('error') or 'measured'}", file=sys.stderr)
    return rows


def rows_from_results(path: Path) -> list[dict]:
    """The same rows from a ``quantkit compare`` results file."""
    rows = []
    for r in json.loads(path.read_text()):
        row = {
            "method": r["method"],
            "estimated_bits": r.get("estimated_bits_per_param"),
            "estimated_bytes": r.get("estimated_size_bytes"),
            "bits": r.get("bits_per_param"),
            "size_bytes": r.get("size_bytes"),
        }
        if r.get("status") != "ok":
            row["error"] = f"{r.get('status')}: {r.get('reason')}"
        rows.append(row)
    return rows


def measured_table(rows: list[dict]) -> Table:
    table = Table(title="estimator vs measured (saved files)")
    for column in ("method", "bits/param measured", "estimated", "error", "size MB measured", "estimated MB", "error "):
        table.add_column(column, justify="left" if column == "method" else "right")
    errors = [f"{r['method']}: {r['error']}" for r in rows if r.get("error")]
    table.caption, table.caption_justify = "\n".join(errors) or None, "left"
    for r in rows:
        if r.get("bits") is None:
            table.add_row(
                r["method"],
                "-",
                _fmt(r.get("estimated_bits"), "{:.4f}"),
                "-",
                "-",
                _fmt(r.get("estimated_bytes"), "mb"),
                "-",
            )
            continue
        table.add_row(
            r["method"],
            f"{r['bits']:.4f}",
            _fmt(r.get("estimated_bits"), "{:.4f}"),
            _rel(r["bits"], r.get("estimated_bits")),
            f"{r['size_bytes'] / 1e6:.2f}",
            _fmt(r.get("estimated_bytes"), "mb"),
            _rel(r["size_bytes"], r.get("estimated_bytes")),
        )
    return table


def seed_rows() -> list[dict]:
    """Predicted sizes of Llama-2 7B/13B/70B in the seed formats."""
    rows = []
    for size, shape in LLAMA2.items():
        arch = {"model_type": "llama", "vocab_size": 32000, "tie_word_embeddings": False, **shape}
        for label, name, dtype, bits in SEED_FORMATS:
            config = preset(name) if name else None
            from_count = estimate(size, config, dtype=dtype if config is None else "float16")
            from_arch = estimate(config=config, model_config=arch, dtype=dtype)
            popular = float(size.rstrip("B")) * 1e9 * bits / 8
            rows.append(
                {
                    "model": f"Llama-2-{size}",
                    "format": label,
                    "popular_gb": popular / 1e9,
                    "params": from_arch.params,
                    "bits_per_param": from_arch.bits_per_param,
                    "count_gb": from_count.total_bytes / 1e9,
                    "arch_gb": from_arch.total_bytes / 1e9,
                    "arch_gib": from_arch.total_bytes / 2**30,
                    "popular_error_pct": 100 * (popular / from_arch.total_bytes - 1),
                }
            )
    return rows


def seed_table(rows: list[dict]) -> Table:
    table = Table(title="Llama-2 memory: popular figures vs the estimator")
    for column in (
        "model",
        "format",
        "popular GB",
        "bits/param",
        "from count GB",
        "architecture GB",
        "architecture GiB",
        "popular is off by",
    ):
        table.add_column(column, justify="left" if column in ("model", "format") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            r["format"],
            f"{r['popular_gb']:.1f}",
            f"{r['bits_per_param']:.3f}",
            f"{r['count_gb']:.2f}",
            f"{r['arch_gb']:.2f}",
            f"{r['arch_gib']:.2f}",
            f"{r['popular_error_pct']:+.1f}%",
        )
    return table


def seed_notes(rows: list[dict]) -> list[str]:
    """Where the popular rounded figures go wrong, computed from the rows."""
    notes = []
    for r in rows:
        if abs(r["popular_error_pct"]) >= 5:
            notes.append(
                f"{r['model']} {r['format']}: the popular {r['popular_gb']:.1f} GB is "
                f"{abs(r['popular_error_pct']):.0f}% {'over' if r['popular_error_pct'] > 0 else 'under'} "
                f"the {r['arch_gb']:.2f} GB ({r['arch_gib']:.2f} GiB) the format stores "
                f"({r['params'] / 1e9:.2f} B parameters, {r['bits_per_param']:.3f} bits per linear weight)"
            )
    return notes


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f}" if fmt == "mb" else fmt.format(value)


def _rel(measured: float, estimated: float | None) -> str:
    return "-" if not estimated else f"{100 * (measured / estimated - 1):+.3f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model to quantize (default: the embedded SmolLM2-135M)")
    parser.add_argument("--methods", default=",".join(MEASURED_METHODS), help="comma-separated presets")
    parser.add_argument("--from-results", type=Path, help="take the measured sizes from a compare results JSON")
    parser.add_argument("--seed-only", action="store_true", help="only the 7B/13B/70B table")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="write both tables as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    console = Console(width=max(Console().width, 130))
    console.print(run_header(), highlight=False)
    measured = []
    if not args.seed_only:
        if args.from_results:
            measured = rows_from_results(args.from_results)
        else:
            measured = measured_rows([m for m in args.methods.split(",") if m], args.model, args.threads)
        console.print(measured_table(measured))
    seeds = seed_rows()
    console.print(seed_table(seeds))
    for note in seed_notes(seeds):
        console.print(f"- {note}", highlight=False)
    if args.json:
        args.json.write_text(json.dumps({"measured": measured, "seed": seeds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
