"""What the results say: the Pareto front and the sanity checks a sound comparison passes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import QuantkitError
from ..core.resolve import config_from_dict
from .methods import BASELINE
from .results import Result


def pareto_front(results: Sequence[Result], x: str = "bits_per_param", y: str = "perplexity") -> list[str]:
    """Methods no other method beats on both fields ``x`` and ``y`` (lower is better), by ascending ``x``."""
    points = [(getattr(r, x), getattr(r, y), r.method) for r in results if r.measured and getattr(r, x) is not None]
    front = [
        p for p in points if not any(o[0] <= p[0] and o[1] <= p[1] and (o[0] < p[0] or o[1] < p[1]) for o in points)
    ]
    return [name for *_, name in sorted(front)]


@dataclass(frozen=True)
class Check:
    """One sanity check of the results: ``status`` is ``PASS``, ``FAIL`` or ``SKIP``."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


def _verdict(name: str, outcomes: list[tuple[str, bool]], skip: str) -> Check:
    if not outcomes:
        return Check(name, "SKIP", skip)
    status = "PASS" if all(ok for _, ok in outcomes) else "FAIL"
    return Check(name, status, "; ".join(f"{text} {'ok' if ok else 'FAILED'}" for text, ok in outcomes))


def _width(result: Result) -> float | None:
    """The bit class of a result: its stored code width rounded, else its nominal bits."""
    width = result.code_bits or result.nominal_bits
    return None if width is None else float(round(width))


def _grid(result: Result) -> tuple[int | None, bool | None]:
    """Group size and symmetry of a result's grid (``None`` where the config has none, or no
    installed backend reads it)."""
    try:
        config = config_from_dict(result.config)
    except QuantkitError:
        return None, None
    return getattr(config, "group_size", None), config.symmetric


def run_checks(results: Sequence[Result], ppl_tolerance: float = 0.01, size_tolerance: float = 0.01) -> list[Check]:
    """The checks a default comparison should pass, computed from the (completed) results:

    - every 8-bit method within ``ppl_tolerance`` of the baseline's perplexity;
    - every 4-bit method between the worst 8-bit and the best 2-bit one;
    - every calibrated method ahead of round-to-nearest at the same bits (same group size
      and grid where such a run exists);
    - every measured bits/param within ``size_tolerance`` of the estimator's.

    A method's width is its ``code_bits`` (the mean width of its stored weight codes) rounded,
    else its nominal bits: a Q2_K mix whose rows llama.cpp stores as Q4_0 counts as 4-bit.
    """
    measured = [r for r in results if r.measured]
    ok = [r for r in measured if r.method != BASELINE]
    base = next((r for r in measured if r.method == BASELINE), None)
    by_bits: dict[float, list[Result]] = {}
    for r in ok:
        if not r.is_float and _width(r) is not None:
            by_bits.setdefault(_width(r), []).append(r)
    checks = []

    eight = by_bits.get(8.0, [])
    outcomes = (
        []
        if base is None
        else [
            (f"{r.method} {r.delta_perplexity_pct:+.2f}%", abs(r.perplexity / base.perplexity - 1) <= ppl_tolerance)
            for r in eight
        ]
    )
    checks.append(
        _verdict(
            f"8-bit within {ppl_tolerance:.0%} of baseline perplexity",
            outcomes,
            "needs the baseline and an 8-bit method",
        )
    )

    four, two = by_bits.get(4.0, []), by_bits.get(2.0, [])
    outcomes = []
    if eight and two:
        low, high = max(r.perplexity for r in eight), min(r.perplexity for r in two)
        outcomes = [
            (f"{r.method} {r.perplexity:.3f} in [{low:.3f}, {high:.3f}]", low <= r.perplexity <= high) for r in four
        ]
    checks.append(
        _verdict("4-bit between 8-bit and 2-bit perplexity", outcomes, "needs 4-bit, 8-bit and 2-bit methods")
    )

    outcomes = []
    for r in ok:
        if not r.requires_calibration or _width(r) is None:
            continue
        grid = _grid(r)
        rtn = [o for o in by_bits.get(_width(r), []) if o.config.get("quant_method") == "rtn"]
        same_group = [o for o in rtn if _grid(o)[0] == grid[0]]
        same_grid = [o for o in same_group if _grid(o) == grid]
        for o in same_grid or same_group or rtn:
            outcomes.append(
                (f"{r.method} {r.perplexity:.3f} < {o.method} {o.perplexity:.3f}", r.perplexity < o.perplexity)
            )
    checks.append(
        _verdict(
            "calibrated methods ahead of RTN at equal bits",
            outcomes,
            "needs a calibrated method and RTN at the same bits",
        )
    )

    outcomes = []
    for r in ok:
        est = r.estimated_bits_per_param
        if est:
            err = r.bits_per_param / est - 1
            outcomes.append(
                (f"{r.method} {r.bits_per_param:.3f} vs {est:.3f} ({err:+.2%})", abs(err) <= size_tolerance)
            )
    checks.append(
        _verdict(
            f"measured bits/param within {size_tolerance:.0%} of the estimator",
            outcomes,
            "needs measured methods with estimates",
        )
    )
    return checks
