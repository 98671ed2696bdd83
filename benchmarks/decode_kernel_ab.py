"""Batch-1 decode of one ``.gguf`` with one ggml type's layers on each of two kernels, in one process.

    python benchmarks/decode_kernel_ab.py /tmp/quantkit-scale/Llama-3.2-1B-decode-Q4_K_M.gguf
    python benchmarks/decode_kernel_ab.py MODEL.gguf --qtype Q6_K --kernels q6k-avx512,gemv-inductor --rounds 5

What one kernel is worth to a whole model: ``quantkit.load`` picks every layer's kernel, then the
layers of ``--qtype`` are switched between the ``--kernels`` (``quantkit.set_kernel``, both
prepared before timing) round after round, the other layers untouched. Each round times
``quantkit.evaluate.decode_speed`` (``--new-tokens`` greedy tokens after a 128-token random prompt
and 2 untimed steps) once per kernel, alternately; the best round per kernel and every round's
ratio are reported. Peak RSS: the process's, both kernels' states held.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import torch
from run_log import RunLog  # this folder's scripts import each other when run

import quantkit
from quantkit.builtin_backends.gguf.qlinear import GGUFLinear
from quantkit.core.dispatch import chosen_kernels, set_kernel
from quantkit.evaluate import decode_speed

RESULTS = Path(__file__).parent / "results" / "decode_kernel_ab.txt"
PROMPT_TOKENS = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--qtype", default="Q6_K")
    parser.add_argument("--kernels", default="q6k-avx512,gemv-inductor", help="the two kernels, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    log = RunLog("decode_kernel_ab.py")
    kernels = args.kernels.split(",")
    model = quantkit.load(args.gguf, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear) and m.qtype == args.qtype]
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for kernel in kernels:  # prepare both before anything is timed
            for layer in layers:
                set_kernel(layer, kernel)
            model(input_ids=prompt[:, :8])
        chosen = list(chosen_kernels(model).values())
        counts = {kernel: chosen.count(kernel) for kernel in sorted(set(chosen))}
        log.emit(f"{args.gguf.name}: {len(layers)} {args.qtype} layers switched; with {kernel}, kernels: {counts}")
        best = dict.fromkeys(kernels, 0.0)
        for round_ in range(1, args.rounds + 1):
            speeds = {}
            for kernel in kernels:
                for layer in layers:
                    set_kernel(layer, kernel)
                speeds[kernel] = decode_speed(model, prompt, args.new_tokens)
                best[kernel] = max(best[kernel], speeds[kernel])
            line = ", ".join(f"{k} {v:.2f} tok/s" for k, v in speeds.items())
            log.emit(f"round {round_}: {line}; ratio {speeds[kernels[0]] / speeds[kernels[1]]:.2f}x")
    line = ", ".join(f"{k} {v:.2f} tok/s" for k, v in best.items())
    log.emit(f"best: {line}; {best[kernels[0]] / best[kernels[1]]:.2f}x")
    log.emit(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    log.write(args.out)


if __name__ == "__main__":
    main()
