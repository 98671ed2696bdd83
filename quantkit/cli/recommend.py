"""``quantkit recommend``: a method for a hardware and a goal, with the reasons."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from ..compare import GOALS, load_results, recommend
from ..core.hardware import Hardware


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "A decision tree over the backends' declared capabilities and, with --results, "
        "the measurements of quantkit compare. Prints one line per rule applied."
    )
    parser.add_argument("--hardware", required=True, choices=[h.value for h in Hardware])
    parser.add_argument("--goal", required=True, choices=GOALS)
    parser.add_argument("--results", type=Path, help="a quantkit compare results JSON (--json or OUT/results.json)")
    parser.add_argument(
        "--max-ppl-increase",
        type=float,
        default=10.0,
        help="percent of perplexity over the baseline smallest/fastest may give up (default 10)",
    )
    parser.add_argument(
        "--min-bits",
        type=float,
        help="lowest nominal bits 'smallest' considers without measurements "
        "(default: each backend's declared quality floor, 3 for scalar codes, 2 for AQLM)",
    )
    parser.add_argument("--json", action="store_true", help="print the recommendation as JSON")


def run(args: argparse.Namespace) -> int:
    results = load_results(args.results) if args.results else None
    rec = recommend(
        args.hardware, args.goal, results=results, max_ppl_increase=args.max_ppl_increase, min_bits=args.min_bits
    )
    if args.json:
        print(json.dumps(rec.to_dict(), indent=2))
        return 0 if rec.method else 1
    console = Console()
    for reason in rec.reasons:
        console.print(f"- {reason}", highlight=False)
    if rec.method is None:
        console.print("[red]no recommendation[/]")
        return 1
    console.print(f"[bold]recommended:[/] {rec.method}  {json.dumps(rec.config)}", highlight=False)
    if rec.alternatives:
        console.print(f"alternatives: {', '.join(rec.alternatives)}", highlight=False)
    return 0
