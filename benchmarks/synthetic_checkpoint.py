"""Write a synthetic float checkpoint with the exact shapes of a real model (random bf16 weights).

    .venv/bin/python benchmarks/synthetic_checkpoint.py Llama-3.2-1B /tmp/llama-1b
    .venv/bin/python benchmarks/synthetic_checkpoint.py Qwen2.5-7B /tmp/qwen-7b --shard-gb 2

Presets: Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B, Qwen2.5-7B (and tiny-llama for tests); see
:mod:`quantkit.testing.synthetic_checkpoints`. The hub's layout (5 GB shards and their index),
one tensor in memory at a time. Prints the folder, its size and the time taken.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from quantkit.core.safetensors_files import stored_bytes
from quantkit.testing.synthetic_checkpoints import PRESETS, write_synthetic_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, in GB (10^9 bytes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    args = parser.parse_args()
    start = time.perf_counter()
    folder = write_synthetic_checkpoint(
        args.folder,
        args.preset,
        max_shard_bytes=int(args.shard_gb * 10**9),
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
    )
    size = stored_bytes(folder, ())["size_bytes"]
    print(f"{args.preset}: {folder} ({size / 10**9:.2f} GB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
