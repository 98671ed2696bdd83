"""Scripted sweeps over ``quantkit compare``: several models, token budgets or window lengths.

    python benchmarks/compare_methods.py                                  # the default comparison
    python benchmarks/compare_methods.py --methods nf4,int8 --tokens 2048 4096 --seqlen 256 512
    python benchmarks/compare_methods.py --model path/to/model --out sweeps/
    python benchmarks/compare_methods.py --model a --model b --ray [ADDRESS]      # every method a Ray task

Each combination is one resumable comparison in ``OUT/<model>-t<tokens>-s<seqlen>/`` with
its own results, report and plots; a summary of every run's checks is printed at the end.
By default the combinations run one after the other, each method in a local worker process;
with ``--ray`` every method of every combination is a Ray task, all of them submitted at once
(a local Ray instance without ADDRESS; on a cluster, OUT must be on a filesystem every node
shares). The command line and the environment are printed first.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console

from quantkit.compare import (
    Comparison,
    Protocol,
    resolve_methods,
    run_checks,
    run_header,
    terminal_table,
    write_reports,
)
from quantkit.compare.ray_executor import LOCAL, RayExecutor
from quantkit.compare.runner import ProcessExecutor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model(s) to compare (default: the embedded SmolLM2-135M)")
    parser.add_argument("--methods", help="comma-separated methods (default: quantkit compare's list)")
    parser.add_argument("--config-file", type=Path, help="YAML/JSON method list, as for quantkit compare")
    parser.add_argument("--dataset", default="pydoc")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[512])
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("compare-sweeps"))
    parser.add_argument("--force", action="store_true")
    parser.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
        help="run every method of every combination as a Ray task, all at once (no ADDRESS: a local Ray instance)",
    )
    args = parser.parse_args(argv)

    console = Console()
    console.print(run_header(), highlight=False)
    executor = ProcessExecutor() if args.ray is None else RayExecutor(args.ray)
    comparisons = []
    for model, tokens, seqlen in itertools.product(args.model or [None], args.tokens, args.seqlen):
        protocol = Protocol(
            model=model,
            dataset=args.dataset,
            eval_tokens=tokens,
            seqlen=seqlen,
            stride=seqlen,
            calibration_samples=args.calibration_samples,
            calibration_seqlen=seqlen,
            device=args.device,
            threads=args.threads,
        )
        methods = resolve_methods(args.methods.split(",") if args.methods else None, protocol, args.config_file)
        out = args.out / f"{Path(model).name if model else 'default'}-t{tokens}-s{seqlen}"
        console.print(f"[bold]{protocol.describe()}[/] -> {out}", highlight=False)
        comparisons.append(
            Comparison(
                methods,
                protocol,
                out,
                force=args.force,
                executor=executor,
                on_event=lambda e, name=out.name: (
                    e.stage in ("done", "failed", "unavailable")
                    and console.print(f"  {name}: {e.method}: {e.stage}", highlight=False)
                ),
            )
        )

    def measure(comparison: Comparison) -> float:
        """Run one comparison and write its reports; its wall time."""
        start = time.perf_counter()
        results = comparison.run()
        wall = time.perf_counter() - start
        protocol = comparison.protocol.describe()
        write_reports(results, comparison.out, protocol, wall_seconds=wall, command=shlex.join(sys.argv))
        return wall

    if args.ray is None:
        walls = [measure(c) for c in comparisons]
    else:  # every comparison submits its tasks at once; Ray runs them as resources allow
        with ThreadPoolExecutor(len(comparisons)) as threads:
            walls = list(threads.map(measure, comparisons))
    summary = []
    for comparison, wall in zip(comparisons, walls):
        results, out = comparison.results(), comparison.out
        console.print(terminal_table(results, width=console.width, title=f"{out.name} ({wall / 60:.1f} min)"))
        checks = run_checks(results)
        for check in checks:
            console.print(f"  {check.line()}", highlight=False)
        summary.append((out.name, wall, checks))
    console.print("\n[bold]summary[/]")
    for name, wall, checks in summary:
        console.print(
            f"{name}: {wall / 60:.1f} min; " + ", ".join(f"{c.status} {c.name}" for c in checks), highlight=False
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
