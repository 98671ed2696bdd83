"""``quantkit compare``: every method on one model, one text, one protocol."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from ..compare import Comparison, Event, Protocol, resolve_methods, run_checks, terminal_table, write_reports
from ..compare.llama_cpp import check_llama_python
from ..compare.ray_executor import LOCAL, RayExecutor
from ..compare.runner import ProcessExecutor
from ..core.hardware import resolve_device
from ..core.resolve import default_comparison


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Quantize the model with every method (each in a fresh process), save it, and measure "
        "bits/param, size, peak memory, quantization time, perplexity, KL divergence and top-1 "
        "agreement against the float baseline, and prefill/decode speed. Results are kept per "
        "method in --out: a rerun resumes, skipping methods already measured."
    )
    parser.add_argument("--model", help="hub id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    parser.add_argument(
        "--methods",
        action="append",
        metavar="LIST",
        help="comma-separated presets, quant_methods, fp32/bf16/fp16, 'default' or 'all' "
        f"(default: {','.join(('fp32', *default_comparison()))}; "
        "the fp32 baseline is always added)",
    )
    parser.add_argument(
        "--config-file",
        type=Path,
        help="YAML/JSON list of methods: preset names or {name, preset|quant_method, fields...}",
    )
    parser.add_argument(
        "--dataset", default=Protocol.dataset, help=f"dataset name or text file (default: {Protocol.dataset}, built in)"
    )
    parser.add_argument(
        "--tokens", type=int, default=Protocol.eval_tokens, help=f"evaluation tokens (default {Protocol.eval_tokens})"
    )
    parser.add_argument(
        "--seqlen", type=int, default=Protocol.seqlen, help=f"evaluation window (default {Protocol.seqlen})"
    )
    parser.add_argument("--stride", type=int, help="window stride (default: --seqlen, no overlap)")
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=Protocol.calibration_samples,
        help=f"calibration windows (default {Protocol.calibration_samples})",
    )
    parser.add_argument("--calibration-seqlen", type=int, help="calibration window length (default: --seqlen)")
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=Protocol.decode_tokens,
        help=f"greedy tokens timed for decode speed (default {Protocol.decode_tokens})",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best present)")
    parser.add_argument(
        "--kernel",
        help="force this kernel on every quantized linear (default: the fastest valid one for each; "
        "see quantkit backends --kernels)",
    )
    parser.add_argument("--threads", type=int, help="torch threads for every method (default: torch's default)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("quantkit-compare"),
        help="folder for per-method results, logs, report and plots (default ./quantkit-compare)",
    )
    parser.add_argument("--json", type=Path, help="also write the results (one object per method) to this file")
    parser.add_argument("--force", action="store_true", help="measure every method again")
    parser.add_argument("--keep-models", action="store_true", help="keep each saved model in OUT/models")
    parser.add_argument(
        "--llama-python",
        metavar="PYTHON",
        help="a Python that imports llama_cpp (llama-cpp-python): GGUF rows also report llama.cpp's own "
        "prefill/decode speed on their .gguf, run by it with the same threads and prompt",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
        help="run every method as a Ray task (CPUs: --threads, a GPU on CUDA, memory: the estimator's "
        "prediction), in parallel where resources allow; no ADDRESS starts a local Ray instance, 'auto' or "
        "ray://HOST:PORT joins a cluster whose nodes share --out's filesystem (needs quantkit[ray]; "
        "default: local worker processes, one at a time)",
    )


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    return Protocol(
        model=args.model,
        dataset=args.dataset,
        eval_tokens=args.tokens,
        seqlen=args.seqlen,
        stride=args.stride or args.seqlen,
        calibration_samples=args.calibration_samples,
        calibration_seqlen=args.calibration_seqlen or args.seqlen,
        device=str(resolve_device(args.device)),
        threads=args.threads or torch.get_num_threads(),
        decode_tokens=args.decode_tokens,
        kernel=args.kernel,
    )


class ProgressView:
    """A progress bar per running method (several at a time on Ray), fed by the workers' events."""

    def __init__(self, console: Console, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.overall = self.progress.add_task("methods", total=total)
        self.running: dict[str, tuple[int, float]] = {}  # method -> its bar, its start

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, event: Event) -> None:
        p = self.progress
        if event.stage in ("done", "failed", "unavailable", "skipped"):
            task, started = self.running.pop(event.method, (None, None))
            if task is not None:
                p.remove_task(task)
            p.advance(self.overall)
            took = f" in {time.perf_counter() - started:.0f} s" if started is not None else ""
            note = " (measured by an earlier run)" if event.stage == "skipped" else ""
            self.console.print(f"{event.method}: {event.stage}{took}{note}", highlight=False)
            return
        if event.stage == "start":
            self.running[event.method] = p.add_task(f"{event.method}: starting", total=None), time.perf_counter()
            return
        if event.method in self.running:
            p.update(
                self.running[event.method][0],
                description=f"{event.method}: {event.stage}",
                total=event.total or None,
                completed=event.done,
            )


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    protocol = protocol_from_args(args)
    names = [n.strip() for item in args.methods or [] for n in item.split(",") if n.strip()]
    methods = resolve_methods(names or None, protocol, args.config_file)
    console.print(f"protocol: {protocol.describe()}", highlight=False)
    console.print(f"methods: {', '.join(m.name for m in methods)}; results in {args.out}", highlight=False)
    start = time.perf_counter()
    view = ProgressView(console, len(methods))
    executor = ProcessExecutor() if args.ray is None else RayExecutor(args.ray)
    if args.llama_python:
        check_llama_python(args.llama_python)
    comparison = Comparison(
        methods,
        protocol,
        args.out,
        force=args.force,
        keep_models=args.keep_models,
        llama_python=args.llama_python,
        on_event=view,
        executor=executor,
    )
    interrupted = False
    with view:
        try:
            comparison.run()
        except KeyboardInterrupt:
            interrupted = True
    wall = time.perf_counter() - start
    results = comparison.results()
    command = "quantkit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    written = write_reports(
        results, args.out, protocol.describe(), json_path=args.json, wall_seconds=wall, command=command
    )
    out = Console()
    out.print(terminal_table(results, width=out.width, title=f"quantkit compare ({wall / 60:.1f} min)"))
    for check in run_checks(results):
        color = {"PASS": "green", "FAIL": "red"}.get(check.status, "yellow")
        out.print(f"[{color}]{check.status}[/] {check.name}: {check.detail}", highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in written.values()), highlight=False)
    if interrupted:
        console.print("[yellow]interrupted[/]: rerun the same command to resume")
        return 130
    return 1 if any(r.status == "failed" for r in results) else 0
