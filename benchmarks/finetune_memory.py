"""Peak memory of LoRA training steps: QLoRA (4-bit NF4 base) against LoRA on the float model.

Each method runs in a subprocess of its own, so that no allocation of one run survives
into another. Quantized bases are saved once with ``quantkit.save`` and loaded by the
worker with ``quantkit.load``, as a QLoRA user loads a 4-bit checkpoint: the float model
is never materialised in the measured process. The worker reports (Linux: ``VmHWM``,
reset through ``/proc/self/clear_refs`` between phases):

- ``load_peak_mib``: peak RSS while loading the model;
- ``before_train_mib``: RSS once loaded;
- ``train_peak_mib``: peak RSS over attaching LoRA and the training steps;
- ``seconds_per_step``.

    python benchmarks/finetune_memory.py --methods float,qlora --steps 3 --seqlen 128
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "float": None,
    "qlora": "qlora",  # quantkit.finetune.qlora_config(True): NF4 + double quantization
    "nf4": "nf4",
    "int8": "int8",
    "hqq": "hqq-4bit-g64",
    "rtn": "rtn-4bit-g128",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="float,qlora", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        return prepare(args.prepare, args.checkpoint)
    if args.worker:
        return worker(args)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    from quantkit.compare import run_header  # here, not at the top: workers measure their own memory

    print(run_header(), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="qk-ft-mem-") as tmp:
        for method in methods:
            checkpoint = Path(tmp) / method
            if METHODS[method] is not None:
                _run([sys.executable, __file__, "--prepare", method, "--checkpoint", str(checkpoint)], args.threads)
            command = [
                sys.executable,
                __file__,
                "--worker",
                method,
                "--checkpoint",
                str(checkpoint),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--seqlen",
                str(args.seqlen),
                "--threads",
                str(args.threads),
            ] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
            result = json.loads(_run(command, args.threads).strip().splitlines()[-1])
            results.append(result)
            print(
                f"{method:6s} load peak {result['load_peak_mib']:7.0f} MiB | "
                f"loaded {result['before_train_mib']:7.0f} MiB"
                f" | train peak {result['train_peak_mib']:7.0f} MiB | {result['seconds_per_step']:.2f} s/step"
                f" | losses {', '.join(f'{x:.3f}' for x in result['losses'])}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def prepare(method: str, checkpoint: Path) -> None:
    """Quantize the default model and save it, in a process of its own."""
    import quantkit
    from quantkit import finetune as ft
    from quantkit.models import load_model

    model, tokenizer = load_model()
    config = ft.qlora_config(True, "cpu") if METHODS[method] == "qlora" else METHODS[method]
    quantkit.save(quantkit.quantize(model, config, device="cpu", tokenizer=tokenizer), checkpoint, tokenizer=tokenizer)


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import quantkit
    from quantkit import finetune as ft
    from quantkit.calibration import calibration_tokens
    from quantkit.models import default_model_folder, load_model

    _reset_peak()
    if METHODS[args.worker] is None:
        model, tokenizer = load_model()
    else:
        from transformers import AutoTokenizer

        model = quantkit.load(args.checkpoint, device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(default_model_folder())
    load_peak, before = _peak_rss(), _rss()
    tokens = calibration_tokens(tokenizer, nsamples=args.steps * args.batch_size, seqlen=args.seqlen)
    _reset_peak()
    start = time.perf_counter()
    result = ft.finetune(
        model,
        tokenizer,
        tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        seqlen=args.seqlen,
        gradient_checkpointing=args.gradient_checkpointing,
        lr=1e-3,
    )
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "method": args.worker,
                "backend": getattr(result.model.get_base_model(), "quantkit_backend", None),
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seqlen": args.seqlen,
                "gradient_checkpointing": args.gradient_checkpointing,
                "threads": args.threads,
                "load_peak_mib": load_peak / 2**20,
                "before_train_mib": before / 2**20,
                "train_peak_mib": _peak_rss() / 2**20,
                "seconds_per_step": seconds / args.steps,
                "losses": result.losses,
            }
        )
    )


def _run(command: list[str], threads: int) -> str:
    env = {**os.environ, "QUANTKIT_QUIET": "1", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (Linux); elsewhere peaks cover the whole process."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    from quantkit.finetune import peak_rss_bytes

    return peak_rss_bytes()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


if __name__ == "__main__":
    main()
