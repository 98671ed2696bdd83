"""Quantize a model with GPTQModel (the reference GPTQ) and save its checkpoint; run by gptq_reference.py.

    VENV/bin/python benchmarks/gptqmodel_worker.py MODEL_DIR TOKENS.json OUT_DIR --bits 4 --group-size 64

Runs in a separate virtual environment holding ``gptqmodel`` (it pins its own torch), so it imports
neither quantkit nor anything of this repository. ``TOKENS.json`` is a list of token-id lists (the
calibration samples). GPTQModel's own defaults apply except where ``--config`` (a JSON object of
``QuantizeConfig`` fields) says otherwise. Prints one JSON line: the versions and the quantization time.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("tokens")
    parser.add_argument("out")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--config", default="{}", help="JSON object of further QuantizeConfig fields")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--backend", default="auto", help="GPTQModel's kernel for packing (AWQ on CPU: awq_torch)")
    args = parser.parse_args()
    # GPTQModel's CPU worker pool defaults to half the cores, and refuses fewer than 2 workers: use every core.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))

    import gptqmodel
    import torch
    import transformers
    from gptqmodel import GPTQModel, QuantizeConfig

    torch.set_num_threads(args.threads)
    with open(args.tokens) as file:
        samples = json.load(file)
    calibration = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in samples]
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, **json.loads(args.config))
    model = GPTQModel.load(args.model, config, device="cpu")
    start = time.perf_counter()
    model.quantize(calibration, batch_size=1, backend=args.backend)
    seconds = time.perf_counter() - start
    model.save(args.out)
    print(
        json.dumps(
            {
                "gptqmodel": gptqmodel.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": args.threads,
                "damp_percent": getattr(config, "damp_percent", None),
                "damp_auto_increment": getattr(config, "damp_auto_increment", None),
                "act_group_aware": getattr(config, "act_group_aware", None),
                "mse": getattr(config, "mse", None),
                "quantize_seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
