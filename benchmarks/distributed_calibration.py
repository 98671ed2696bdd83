"""Data-parallel GPTQ calibration: ``torchrun --nproc-per-node N -m quantkit quantize`` against one process.

Quantizes SmolLM2-135M (the cached safetensors copy) with GPTQ through the command line twice,
once in one process and once as N gloo ranks of one thread each, then compares the two
checkpoints' perplexity on held-out text (the issue's bar: within 0.1 %) and reports each run's
wall time and each rank's share of the work (from the command's log).

    .venv/bin/python benchmarks/distributed_calibration.py --ranks 2 --nsamples 32 --seqlen 256
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from run_log import RunLog
from stream_calibrated import same_bytes, tensors_of

import quantkit
from quantkit.calibration import evaluation_tokens
from quantkit.evaluate import evaluate
from quantkit.models import load_model

SMOLLM2 = Path.home() / ".cache" / "quantkit" / "SmolLM2-135M-Instruct"
RESULTS = Path(__file__).parent / "results" / "distributed_calibration.txt"


def start(log: RunLog, args: argparse.Namespace, ranks: int, out: Path) -> tuple[subprocess.Popen, float]:
    """Start ``quantkit quantize`` (under torchrun when ``ranks`` > 1); the process and its start time."""
    settings = [f"bits={args.bits}", f"group_size={args.group_size}", f"nsamples={args.nsamples}"]
    settings += [f"seqlen={args.seqlen}", f"true_sequential={str(args.true_sequential).lower()}"]
    cli = ["-m", "quantkit", "quantize", "--model", str(SMOLLM2), "--method", "gptq", "--device", "cpu"]
    cli += [item for setting in settings for item in ("--set", setting)] + ["--out", str(out)]
    if ranks == 1:
        command, threads = [sys.executable, *cli], args.threads
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        command, threads = [str(torchrun), "--standalone", f"--nproc-per-node={ranks}", *cli], 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log.emit(f"$ OMP_NUM_THREADS={threads} {' '.join(command)}")
    with open(out.with_suffix(".log"), "w") as stream:  # a file, not a pipe: two runs at once cannot block
        process = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT)
    return process, time.perf_counter()


def finish(log: RunLog, runs: list[tuple[int, subprocess.Popen, float]]) -> list[float]:
    """Wait for the runs ``(ranks, process, start time)`` from :func:`start`, log their report
    lines; their wall times."""
    ended: dict[int, float] = {}
    while len(ended) < len(runs):
        for index, (_, process, _) in enumerate(runs):
            if index not in ended and process.poll() is not None:
                ended[index] = time.perf_counter()
        time.sleep(1)
    return [_report(log, ranks, process, ended[i] - started) for i, (ranks, process, started) in enumerate(runs)]


def _report(log: RunLog, ranks: int, process: subprocess.Popen, seconds: float) -> float:
    stderr = Path(process.args[-1]).with_suffix(".log").read_text()
    for line in stderr.splitlines():
        if re.search(r"GPTQ: \d+ layers|error", line):
            log.emit(f"  {line.strip()}")
    if process.returncode:
        log.emit(stderr[-3000:])
        raise SystemExit(f"quantize with {ranks} rank(s) failed ({process.returncode})")
    log.emit(f"  {ranks} rank(s): {seconds:.1f} s wall")
    return seconds


def perplexity(path: Path, tokens: torch.Tensor, seqlen: int) -> float:
    model = quantkit.load(path, "cpu") if path != SMOLLM2 else load_model(str(path))[0]
    with torch.inference_mode():
        return evaluate(model, tokens, seqlen=seqlen).perplexity


def differing_tensors(one: Path, many: Path) -> tuple[int, int]:
    """How many of the tensors in the checkpoint folder ``one`` differ (bits or names) in ``many``; of how many."""
    first, second = tensors_of(one), tensors_of(many)
    differing = sum(1 for name in first if name not in second or not same_bytes(first[name], second[name]))
    return differing + len(second.keys() - first.keys()), len(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one-process run")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument(
        "--concurrent", action="store_true", help="run both quantizations at once (their wall times then share the CPU)"
    )
    args = parser.parse_args()
    log = RunLog(Path(__file__).name)
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "ranks"
        if args.concurrent:
            runs = [(1, *start(log, args, 1, one)), (args.ranks, *start(log, args, args.ranks, many))]
            seconds_one, seconds_many = finish(log, runs)
        else:
            (seconds_one,) = finish(log, [(1, *start(log, args, 1, one))])
            (seconds_many,) = finish(log, [(args.ranks, *start(log, args, args.ranks, many))])
        differing, total = differing_tensors(one, many)
        _, tokenizer = load_model(str(SMOLLM2))
        tokens = evaluation_tokens(tokenizer, max_tokens=args.eval_tokens)
        ppl = {
            name: perplexity(path, tokens, args.eval_seqlen)
            for name, path in [("float", SMOLLM2), ("one", one), ("ranks", many)]
        }
    relative = abs(ppl["ranks"] - ppl["one"]) / ppl["one"]
    log.emit(f"perplexity on {tokens.shape[1]} held-out tokens (windows of {args.eval_seqlen}):")
    log.emit(f"  float {ppl['float']:.4f}; one process {ppl['one']:.4f}; {args.ranks} ranks {ppl['ranks']:.4f}")
    log.emit(f"  relative difference {relative * 100:.4f} % ({'within' if relative <= 1e-3 else 'OUTSIDE'} 0.1 %)")
    log.emit(f"checkpoints: {differing} of {total} tensors differ between one process and {args.ranks} ranks")
    log.emit(f"  wall time: one process {seconds_one:.1f} s, {args.ranks} ranks {seconds_many:.1f} s")
    log.write(RESULTS)


if __name__ == "__main__":
    main()
