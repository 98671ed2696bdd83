"""Fuzzing campaign of quantkit's GGUF reading: thousands of mutated files, every one loaded or refused.

    .venv/bin/python benchmarks/fuzz_gguf.py                       # writes benchmarks/results/fuzz_gguf.txt
    .venv/bin/python benchmarks/fuzz_gguf.py --random 200 --smollm2 50 --out /tmp/fuzz.txt

Seeds: the embedded SmolLM2-135M GGUF (llama.cpp's converter, Q4_1/Q8_0, 98 MB) and tiny
Llamas exported by quantkit (Q4_K_M with a tokenizer; Q8_0 with an untied head, no
tokenizer). Mutations (fixed seeds) come from :mod:`quantkit.testing.fuzz_gguf`: every
structured mutation of the tiny seeds and a fixed sample of SmolLM2's, plus random ones.
Readers: ``quantkit.load`` and the CLI's ``--model x.gguf`` path
(``quantkit.models.load_model``, through transformers). Each group of cases runs in a
spawned worker process under an address-space limit; the parent kills a worker that goes
quiet past the per-case time bound and records that case as hung. Outcomes: loaded a valid
model (its forward pass runs), refused with a QuantkitError, another exception escaped,
hung, or peak memory grew past its bound (``--memory-factor`` times the seed's size, at least
256 MiB). A mutation that must be refused (structural damage) but loads counts as escaped.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 20.0
STARTUP_SECONDS = 300.0
ADDRESS_SPACE = 24 * 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=800, help="random mutations per tiny seed and reader")
    parser.add_argument("--smollm2", type=int, default=200, help="structured SmolLM2 mutations (a fixed sample)")
    parser.add_argument("--smollm2-random", type=int, default=50, help="random SmolLM2 mutations")
    parser.add_argument("--memory-factor", type=float, default=10.0, help="memory bound as a multiple of the seed size")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz_gguf.txt")
    args = parser.parse_args()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="quantkit-fuzz-"))
    seeds = make_seeds(work)
    groups = []
    for name in seeds:
        if name == "smollm2":
            groups.append((name, "quantkit.load", "structured", args.smollm2))
            groups.append((name, "quantkit.load", "random", args.smollm2_random))
            continue
        for reader in ("quantkit.load", "load_model"):
            groups.append((name, reader, "structured", None))
            groups.append((name, reader, "random", args.random if reader == "quantkit.load" else args.random // 5))
    records = []
    for seed_name, reader, source, count in groups:
        path = seeds[seed_name]
        bound = max(256 * 2**20, int(args.memory_factor * path.stat().st_size))
        group = run_group(path, seed_name, reader, source, count, work, bound)
        kinds = Counter(r["kind"] for r in group)
        print(f"{seed_name:14s} {reader:14s} {source:10s} {len(group):5d} {dict(kinds)}", flush=True)
        records += group
    write_summary(args, seeds, groups, records, time.time() - started)


def make_seeds(work: Path) -> dict[str, Path]:
    """The SmolLM2 GGUF and two quantkit exports of tiny Llamas."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_gguf_export import tiny_tokenizer

    import quantkit
    from quantkit import GGUFConfig
    from quantkit.models import default_model_gguf
    from quantkit.testing import tiny_llama

    seeds = {"smollm2": default_model_gguf()}
    model = quantkit.quantize(tiny_llama(0, hidden=64, intermediate=256, layers=4, vocab=512), GGUFConfig())
    quantkit.save(model, work / "tiny-q4_k_m.gguf", tokenizer=tiny_tokenizer())
    seeds["tiny-q4_k_m"] = work / "tiny-q4_k_m.gguf"
    untied = tiny_llama(1, hidden=64, intermediate=128, layers=2, vocab=256)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = type(untied.lm_head.weight)(untied.lm_head.weight.detach().clone())
    model = quantkit.quantize(untied, GGUFConfig(quant_type="Q8_0"))
    quantkit.save(model, work / "tiny-q8_0-untied.gguf")
    seeds["tiny-q8_0-untied"] = work / "tiny-q8_0-untied.gguf"
    return seeds


def run_group(path: Path, seed: str, reader: str, source: str, count: int | None, work: Path, bound: int) -> list:
    """Run one group of cases in spawned workers, restarting one that hangs."""
    from quantkit.testing.fuzz_gguf import structured_mutations

    if source == "structured":
        total = sum(1 for _ in structured_mutations(path.read_bytes()))
        indices = list(range(total))
        if count is not None and count < total:
            indices = sorted(random.Random(0).sample(indices, count))
    else:
        indices = list(range(count))
    context = multiprocessing.get_context("spawn")
    records: dict[int, dict] = {}
    while remaining := [i for i in indices if i not in records]:
        receiver, sender = context.Pipe(duplex=False)
        args = (sender, str(path), reader, source, remaining, str(work / f"case-{seed}.gguf"), bound)
        process = context.Process(target=worker, args=args, daemon=True)
        process.start()
        sender.close()
        current, timeout = None, STARTUP_SECONDS
        while True:
            if not receiver.poll(timeout):
                process.kill()
                index, name = current if current else (remaining[0], "(worker start)")
                records[index] = _record(seed, reader, source, index, name, "hung", SECONDS, 0, "no answer")
                break
            try:
                message = receiver.recv()
            except EOFError:  # the worker died (killed by the kernel for memory, or crashed)
                index, name = current if current else (remaining[0], "(worker start)")
                code = process.join(5) or process.exitcode
                records[index] = _record(seed, reader, source, index, name, "memory", 0, 0, f"worker died ({code})")
                break
            if message[0] == "end":
                break
            if message[0] == "start":
                current, timeout = message[1:3], SECONDS + 30
                continue
            _, index, name, must_refuse, outcome = message
            kind, detail = outcome.kind, outcome.detail
            if kind == "loaded" and must_refuse:
                kind, detail = "escaped", "loaded although the mutation breaks the format"
            records[index] = _record(
                seed, reader, source, index, name, kind, outcome.seconds, outcome.memory_growth, detail
            )
            current, timeout = None, STARTUP_SECONDS
        process.join(5)
        if process.is_alive():
            process.kill()
    return [records[i] for i in indices]


def _record(seed, reader, source, index, name, kind, seconds, memory, detail) -> dict:
    return {
        "seed": seed,
        "reader": reader,
        "source": source,
        "index": index,
        "name": name,
        "kind": kind,
        "seconds": seconds,
        "memory": memory,
        "detail": detail,
    }


def worker(sender, seed_path: str, reader: str, source: str, indices: list[int], case_path: str, bound: int) -> None:
    """Run the cases ``indices`` of one group; report each start and outcome to the parent."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    os.environ["QUANTKIT_QUIET"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF loader shows a progress bar per file
    import torch
    import transformers

    import quantkit
    from quantkit.models import load_model
    from quantkit.testing.fuzz_gguf import Mutation, random_mutation, run_case, structured_mutations

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("quantkit").setLevel(logging.ERROR)
    load = partial(quantkit.load, device="cpu") if reader == "quantkit.load" else (lambda p: load_model(p)[0])
    data = Path(seed_path).read_bytes()
    if source == "structured":
        stream = structured_mutations(data)
    else:
        stream = (
            Mutation(f"random #{k}", partial(random_mutation, data, 7919 * k + 1, edits=1 + k % 6), False)
            for k in range(max(indices) + 1)
        )
    wanted = set(indices)
    for index, mutation in enumerate(stream):
        if index not in wanted:
            continue
        sender.send(("start", index, mutation.name))
        outcome = run_case(load, mutation.data, Path(case_path), seconds=SECONDS, memory_bytes=bound)
        sender.send(("done", index, mutation.name, mutation.must_refuse, outcome))
    sender.send(("end",))


def write_summary(args, seeds: dict[str, Path], groups: list, records: list, elapsed: float) -> None:
    import gguf
    import torch
    import transformers

    kinds = ("loaded", "refused", "escaped", "hung", "memory")
    lines = [
        " ".join(["$ .venv/bin/python benchmarks/fuzz_gguf.py", *sys.argv[1:]]),
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"gguf {gguf.__version__ if hasattr(gguf, '__version__') else '0.19'}, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, {elapsed / 60:.1f} min",
        f"per-case time bound {SECONDS:.0f} s; memory bound max(256 MiB, {args.memory_factor:g} x seed size)",
        "",
        "seeds: " + ", ".join(f"{name} ({path.stat().st_size / 1e6:.2f} MB)" for name, path in seeds.items()),
        "",
        f"{'seed':16s} {'reader':14s} {'mutations':10s} {'inputs':>6s} " + " ".join(f"{k:>8s}" for k in kinds),
    ]
    for seed, reader, source, _ in groups:
        group = [r for r in records if (r["seed"], r["reader"], r["source"]) == (seed, reader, source)]
        counts = Counter(r["kind"] for r in group)
        lines.append(
            f"{seed:16s} {reader:14s} {source:10s} {len(group):6d} " + " ".join(f"{counts[k]:8d}" for k in kinds)
        )
    counts = Counter(r["kind"] for r in records)
    lines.append(f"{'total':16s} {'':14s} {'':10s} {len(records):6d} " + " ".join(f"{counts[k]:8d}" for k in kinds))
    lines.append("")
    bad = [r for r in records if r["kind"] not in ("loaded", "refused")]
    lines.append(f"escaped, hung or memory blowups: {len(bad)}")
    lines += [f"  {r['seed']} {r['reader']} {r['name']}: {r['kind']} {r['detail'][:200]}" for r in bad]
    for seed, path in seeds.items():
        mine = [r for r in records if r["seed"] == seed]
        refused = [r for r in mine if r["kind"] == "refused"]
        slowest = max(refused, key=lambda r: r["seconds"], default=None)
        if slowest:
            lines.append(f"{seed}: slowest refusal {slowest['seconds']:.2f} s ({slowest['name']})")
        for kind in ("refused", "loaded"):
            peak = max((r for r in mine if r["kind"] == kind), key=lambda r: r["memory"], default=None)
            if peak:
                lines.append(
                    f"{seed}: largest peak-memory growth when {kind}: {peak['memory'] / 2**20:.0f} MiB = "
                    f"{peak['memory'] / path.stat().st_size:.1f} x the file ({peak['name']})"
                )
    structured = sorted({r["name"] for r in records if r["kind"] == "loaded" and r["source"] == "structured"})
    lines += ["", "structured mutations that loaded (valid files: optional keys removed, other context lengths, ...):"]
    lines.append("  " + "; ".join(structured))
    randoms = sum(1 for r in records if r["kind"] == "loaded" and r["source"] == "random")
    lines.append(f"random mutations that loaded (damage inside tensor data or padding): {randoms}")
    lines.append("(load_model also needs the tokenizer: it refuses every input of tiny-q8_0-untied, which has none)")
    lines.append("")
    lines.append("refusals, first words of the message (count):")
    reasons = Counter(_reason(r["detail"]) for r in records if r["kind"] == "refused")
    lines += [f"  {n:6d}  {reason}" for reason, n in reasons.most_common(25)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _reason(detail: str) -> str:
    """A refusal message without the file name and numbers, to group them."""
    text = detail.split("': ", 1)[-1] if "': " in detail else detail
    words = [w for w in text.split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:7])


if __name__ == "__main__":
    main()
