"""SmolLM2-135M prefill through ``int4-cpu``: torch's int4 operator on every call, against the
kernel's dense path (from ``DENSE_ROWS`` input rows, a bfloat16 GEMM on the weight dequantized for
the call), against float32.

    python benchmarks/int4_prefill.py --repeats 3

RTN 4-bit g64 (every SmolLM2 linear takes ``int4-cpu``); one 512-token forward pass of the built-in
text without a cache; the variants alternate for ``--repeats`` rounds, each keeps its best tokens/s.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from kernel_decode import prefill_speed  # this folder's scripts import each other when run
from run_log import RunLog

from quantkit import RTNConfig, quantize
from quantkit.calibration import evaluation_tokens
from quantkit.core import torch_kernels
from quantkit.core.hardware import bf16_native
from quantkit.models import load_model

RESULTS = Path(__file__).parent / "results" / "int4_prefill.txt"
TOKENS = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    log = RunLog("int4_prefill.py")
    log.emit(f"native bfloat16 matmuls on this CPU: {bf16_native('cpu')}")
    model, tokenizer = load_model()
    model.eval()
    quantized = quantize(copy.deepcopy(model), RTNConfig(bits=4, group_size=64), device="cpu")
    window = evaluation_tokens(tokenizer, "pydoc", max_tokens=TOKENS)
    dense_rows = torch_kernels.DENSE_ROWS
    variants = {"float32": (model, dense_rows), "int4 operator always": (quantized, 10**9)}
    variants[f"int4-cpu (dense from {dense_rows} rows)"] = (quantized, dense_rows)
    best = dict.fromkeys(variants, 0.0)
    with torch.inference_mode():
        prefill_speed(quantized, window)  # the kernels' one-off repacking
        for _ in range(args.repeats):
            for label, (variant, rows) in variants.items():
                torch_kernels.DENSE_ROWS = rows
                best[label] = max(best[label], prefill_speed(variant, window))
    torch_kernels.DENSE_ROWS = dense_rows
    for label, tokens_per_s in best.items():
        log.emit(f"{label:<36} {tokens_per_s:7.0f} tokens/s  {tokens_per_s / best['float32']:.2f}x float32")
    log.emit(f"one {TOKENS}-token forward without a cache, RTN 4-bit g64; best of {args.repeats} rounds")
    log.write(RESULTS)


if __name__ == "__main__":
    main()
