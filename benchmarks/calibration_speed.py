"""Wall time, peak memory and FLOP count of GPTQ and AWQ calibration (quantkit.layerwise).

    python benchmarks/calibration_speed.py                      # SmolLM2-135M, 128 x 512 tokens
    python benchmarks/calibration_speed.py --nsamples 32 --methods gptq --threads 2

For each method it quantizes a fresh copy of the model and prints the measured time next to
an analytic FLOP count of what the method computes (forward passes, Hessians or scale search,
the GPTQ solves), and the time that count would take at this machine's measured float32
matmul speed (the "floor"). Peak RSS is sampled every 50 ms by a background thread.
The machine may be shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import threading
import time
from dataclasses import dataclass

import psutil
import torch

import quantkit
from quantkit import AWQConfig, GPTQConfig
from quantkit.calibration import calibration_tokens
from quantkit.compare import run_header
from quantkit.layerwise import decoder_stack
from quantkit.models import load_model


@dataclass(frozen=True)
class Shapes:
    """Per-layer sizes of a Llama-family decoder."""

    layers: int
    hidden: int
    q_out: int
    kv_out: int
    mlp: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> Shapes:
        attention = decoder_stack(model).layers[0].self_attn
        return cls(
            layers=len(decoder_stack(model).layers),
            hidden=attention.q_proj.in_features,
            q_out=attention.q_proj.out_features,
            kv_out=attention.k_proj.out_features,
            mlp=decoder_stack(model).layers[0].mlp.up_proj.out_features,
        )

    # FLOPs per token of each part of a layer's forward pass.
    def qkv(self) -> float:
        return 2 * self.hidden * (self.q_out + 2 * self.kv_out)

    def attention(self, seqlen: int) -> float:
        return 4 * self.q_out * seqlen  # scores and weighted sum, full (non-causal) matrices

    def o(self) -> float:
        return 2 * self.q_out * self.hidden

    def gate_up(self) -> float:
        return 4 * self.hidden * self.mlp

    def down(self) -> float:
        return 2 * self.mlp * self.hidden

    def layer(self, seqlen: int) -> float:
        return self.qkv() + self.attention(seqlen) + self.o() + self.gate_up() + self.down()

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of every linear of a layer."""
        h = self.hidden
        return [
            (self.q_out, h),
            (self.kv_out, h),
            (self.kv_out, h),
            (h, self.q_out),
            (self.mlp, h),
            (self.mlp, h),
            (h, self.mlp),
        ]

    def group_inputs(self) -> list[int]:
        """Input width of each group of linears sharing an input."""
        return [self.hidden, self.q_out, self.hidden, self.mlp]


def gptq_flops(s: Shapes, tokens: int, seqlen: int) -> dict[str, float]:
    """Forward passes (true_sequential: each group's pass stops at its input), Hessians, solves."""
    prefix = [
        0,
        s.qkv() + s.attention(seqlen),
        s.qkv() + s.attention(seqlen) + s.o(),
        s.qkv() + s.attention(seqlen) + s.o() + s.gate_up(),
    ]
    forward = s.layers * tokens * sum(prefix) + (s.layers - 1) * tokens * s.layer(seqlen)
    hessians = s.layers * tokens * sum(2 * n * n for n in s.group_inputs())
    # Cholesky, inverse and lazy-batch updates: about out * in^2 + in^3 per linear.
    solves = s.layers * sum(out * inp * inp + inp**3 for out, inp in s.linears())
    return {"forward": forward, "hessians": hessians, "solves": solves}


def awq_flops(s: Shapes, tokens: int, seqlen: int, search_tokens: int, n_grid: int = 20) -> dict[str, float]:
    """Statistics pass (stops at down_proj's input), output pass, scale grid search, clip search."""
    stats = s.layers * tokens * (s.layer(seqlen) - s.down())
    output = (s.layers - 1) * tokens * s.layer(seqlen)
    inspected = [s.qkv() + s.attention(seqlen) + s.o(), s.gate_up() + s.down(), s.down()]  # o not scaled with GQA
    search = s.layers * (n_grid + 1) * search_tokens * sum(inspected)
    group_size, shrinks = 64, 10
    clip = s.layers * sum(
        search_tokens * inp * group_size * 2 + shrinks * out * inp * group_size * 2 for out, inp in s.linears()[2:]
    )
    return {"stats pass": stats, "output pass": output, "scale search": search, "clip search": clip}


def matmul_gflops(threads: int) -> float:
    """Measured float32 GEMM speed on a calibration-like shape (8192 x 576 @ 576 x 1536)."""
    a, b = torch.randn(8192, 576), torch.randn(576, 1536)
    a @ b
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        a @ b
        n += 1
    return 2 * 8192 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9


class PeakRSS:
    """Samples this process's resident set size in a background thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder, hub id or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--methods", default="gptq,awq", help="comma-separated: gptq, awq")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4, help="GPTQ bits (AWQ is 4-bit)")
    parser.add_argument("--gptq-group-size", type=int, default=128)
    parser.add_argument("--awq-group-size", type=int, default=64, help="must divide every in_features (576: 64)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(run_header(), flush=True)
    model, tokenizer = load_model(args.model)
    tokens = calibration_tokens(tokenizer, nsamples=args.nsamples, seqlen=args.seqlen)
    shapes = Shapes.of(model)
    gflops = matmul_gflops(args.threads)
    print(
        f"{args.nsamples} x {args.seqlen} tokens, {args.threads} threads, float32 GEMM {gflops:.0f} GFLOP/s, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    results = []
    for method in args.methods.split(","):
        if method == "gptq":
            config = GPTQConfig(
                bits=args.bits, group_size=args.gptq_group_size, nsamples=args.nsamples, seqlen=args.seqlen
            )
            flops = gptq_flops(shapes, tokens.numel(), args.seqlen)
        elif method == "awq":
            from quantkit.builtin_backends.awq.backend import DEFAULT_SEARCH_TOKENS

            config = AWQConfig(group_size=args.awq_group_size, nsamples=args.nsamples, seqlen=args.seqlen)
            search = max(1, DEFAULT_SEARCH_TOKENS // args.seqlen) * args.seqlen
            flops = awq_flops(shapes, tokens.numel(), args.seqlen, min(search, tokens.numel()))
        else:
            parser.error(f"unknown method {method!r}: use gptq or awq")
        work = copy.deepcopy(model)
        with PeakRSS() as rss:
            start = time.perf_counter()
            quantkit.quantize(work, config, calibration=tokens, device="cpu")
            seconds = time.perf_counter() - start
        del work
        total = sum(flops.values())
        result = {
            "method": method,
            "config": config.to_diff_dict(),
            "seconds": round(seconds, 1),
            "peak_rss_mib": round(rss.peak / 2**20),
            "tflop": round(total / 1e12, 2),
            "tflop_parts": {k: round(v / 1e12, 2) for k, v in flops.items()},
            "floor_seconds": round(total / (gflops * 1e9), 1),
            "achieved_gflops": round(total / seconds / 1e9, 1),
            "load_average": round(os.getloadavg()[0], 1),
        }
        results.append(result)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in result["tflop_parts"].items())
        print(
            f"{method}: {seconds:.1f} s, peak RSS {result['peak_rss_mib']} MiB, {total / 1e12:.1f} TFLOP ({parts}) "
            f"-> {result['achieved_gflops']:.0f} GFLOP/s achieved; floor at {gflops:.0f} GFLOP/s: "
            f"{result['floor_seconds']:.0f} s ({seconds / result['floor_seconds']:.2f}x)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
