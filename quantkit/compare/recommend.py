"""Recommend a quantization method for a hardware and a goal.

A small decision tree over what the backends declare (hardware, trainability,
calibration, bits, availability here) and, when given, what ``quantkit compare``
measured. Every rule applied adds one line to the explanation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..api import backends as all_backends
from ..core.backend import Backend
from ..core.errors import ConfigValueError
from ..core.hardware import Hardware, hardware_of
from ..core.registry import get_registry
from ..core.resolve import preset
from .results import Result, complete

GOALS = ("inference", "fine-tuning", "smallest", "fastest", "accurate")
TYPICAL_LAYER = (4096, 4096)


@dataclass(frozen=True)
class Candidate:
    """A preset one of the eligible backends can run, with what is known of it."""

    method: str
    backend: Backend | None
    """``None`` for a measured unquantized model."""
    config: dict
    nominal_bits: float | None
    bits_per_param: float | None
    """Measured when results are given, else the format's stored bits on a 4096x4096 layer."""
    result: Result | None = None


@dataclass
class Recommendation:
    """The chosen method (``None`` when nothing fits), its config and the reasons."""

    hardware: Hardware
    goal: str
    method: str | None = None
    config: dict | None = None
    reasons: list[str] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The recommendation as plain data (``quantkit recommend --json``)."""
        return {
            "hardware": self.hardware.value,
            "goal": self.goal,
            "method": self.method,
            "config": self.config,
            "reasons": self.reasons,
            "alternatives": self.alternatives,
        }


def recommend(
    hardware: Hardware | str,
    goal: str,
    *,
    results: Sequence[Result] | None = None,
    backends: Sequence[Backend] | None = None,
    max_ppl_increase: float = 10.0,
    min_bits: float | None = None,
) -> Recommendation:
    """Pick a method for ``goal`` on ``hardware``.

    ``results`` (of ``quantkit compare``, see :func:`load_results`) turn estimates into measurements;
    ``max_ppl_increase`` (percent over the float baseline) bounds the quality
    ``smallest`` and ``fastest`` may give up, ``min_bits`` the nominal width
    ``smallest`` goes down to without measurements (default: each backend's declared
    ``quality_floor_bits``).
    """
    hardware = Hardware(hardware)
    if goal not in GOALS:
        raise ConfigValueError("recommend", "goal", goal, ", ".join(GOALS))
    if backends is None:
        backends = all_backends()
    rec = Recommendation(hardware, goal)
    eligible = _eligible_backends(backends, hardware, goal, rec)
    candidates = _candidates(eligible)
    if results is not None:
        results = complete(results)
        candidates = _measured(candidates, results, eligible, goal, rec)
    if not candidates:
        rec.reasons.append("no method satisfies these rules")
        return rec
    choose = {
        "inference": _for_inference,
        "fine-tuning": _for_fine_tuning,
        "smallest": _smallest,
        "fastest": _fastest,
        "accurate": _accurate,
    }[goal]
    ranked = choose(
        candidates,
        rec,
        hardware=hardware,
        measured=results is not None,
        max_ppl_increase=max_ppl_increase,
        min_bits=min_bits,
    )
    if ranked:
        rec.method, rec.config = ranked[0].method, ranked[0].config
        rec.alternatives = [c.method for c in ranked[1:4]]
    else:
        rec.reasons.append("no method satisfies these rules")
    return rec


# -- the rules ---------------------------------------------------------------------------


def _eligible_backends(
    backends: Sequence[Backend], hardware: Hardware, goal: str, rec: Recommendation
) -> list[Backend]:
    unavailable = []
    runs = []
    for b in backends:
        availability = b.is_available()
        if not availability:
            unavailable.append(f"{b.name} ({availability.reason})")
        elif hardware in b.capabilities.quantize_hardware and hardware in b.capabilities.inference_hardware:
            runs.append(b)
    rec.reasons.append(
        f"hardware {hardware.value}: backends that quantize and run there: "
        f"{', '.join(b.name for b in runs) or '(none)'}"
        + (f"; unavailable here: {', '.join(unavailable)}" if unavailable else "")
    )
    if goal == "fine-tuning":
        trainable = [b for b in runs if b.capabilities.trainable]
        rec.reasons.append(
            f"fine-tuning: LoRA adapters train on top of frozen quantized weights only with backends that "
            f"declare trainable: {', '.join(b.name for b in trainable) or '(none)'}"
        )
        runs = trainable
    return runs


def _candidates(backends: Sequence[Backend]) -> list[Candidate]:
    found = []
    for name in get_registry().presets:
        config = preset(name)
        backend = next((b for b in backends if b.config_class.quant_method == config.quant_method), None)
        if backend is None:
            continue
        found.append(Candidate(name, backend, config.to_diff_dict(), config.code_bits, _typical_bits(backend, config)))
    return found


def _measured(
    candidates: list[Candidate], results: Sequence[Result], backends: Sequence[Backend], goal: str, rec: Recommendation
) -> list[Candidate]:
    """Replace estimates with the rows of ``results`` measured with an eligible backend."""
    by_method = {b.config_class.quant_method: b for b in backends}
    measured = []
    for r in results:
        if not r.measured:
            continue
        if r.is_float:
            if goal != "fastest":
                continue
            backend = None
        else:
            backend = by_method.get(r.config.get("quant_method"))
            if backend is None:
                continue
        measured.append(
            Candidate(r.method, backend, r.config or {"dtype": r.dtype}, r.nominal_bits, r.bits_per_param, r)
        )
    skipped = [r.method for r in results if r.status != "ok"]
    rec.reasons.append(
        f"measured results: {len(measured)} eligible method(s) of {len(results)}"
        + (f"; not measured: {', '.join(skipped)}" if skipped else "")
    )
    return measured


def _for_inference(cands: list[Candidate], rec: Recommendation, *, measured: bool, **_) -> list[Candidate]:
    four = [c for c in cands if c.nominal_bits is not None and 3 < c.nominal_bits <= 4]
    rec.reasons.append(
        f"inference: 4-bit methods keep about a quarter of fp16's weight memory at a small "
        f"quality cost: {len(four)} candidate(s)"
    )
    if measured:
        key, what = _quality_key(four)
        rec.reasons.append(f"measured: lowest {what} wins")
        return sorted(four, key=key)
    calibrated = [c for c in four if c.backend.capabilities.requires_calibration]
    if calibrated:
        rec.reasons.append(
            "not measured: calibrated methods ("
            + ", ".join(sorted({c.backend.name for c in calibrated}))
            + ") keep more accuracy than round-to-nearest at equal bits; pick the fewest stored bits"
        )
        four = calibrated
    return sorted(four, key=lambda c: c.bits_per_param or 99)


def _for_fine_tuning(cands: list[Candidate], rec: Recommendation, *, measured: bool, **_) -> list[Candidate]:
    four = [c for c in cands if c.nominal_bits is not None and 3 < c.nominal_bits <= 4] or cands
    if measured:
        key, what = _quality_key(four)
        rec.reasons.append(f"fine-tuning, measured: the frozen base's {what} bounds the adapter; lowest wins")
        return sorted(four, key=key)
    rec.reasons.append(
        "fine-tuning, not measured: the 4-bit base with the fewest stored bits leaves the most "
        "memory for activations and optimizer state (QLoRA's choice)"
    )
    return sorted(four, key=lambda c: c.bits_per_param or 99)


def _smallest(
    cands: list[Candidate],
    rec: Recommendation,
    *,
    measured: bool,
    max_ppl_increase: float,
    min_bits: float | None,
    **_,
) -> list[Candidate]:
    if measured:
        kept = _within_quality(cands, rec, max_ppl_increase)
        rec.reasons.append("smallest: fewest measured bits per parameter wins")
        return sorted(kept, key=lambda c: c.bits_per_param)

    def floor(c: Candidate) -> float:
        return c.backend.capabilities.quality_floor_bits if min_bits is None else min_bits

    kept = [c for c in cands if c.nominal_bits is not None and c.nominal_bits >= floor(c)]
    if min_bits is None:
        floors = sorted({(c.backend.capabilities.quality_floor_bits, c.backend.name) for c in cands})
        below = [f"{name} {bits:g}" for bits, name in floors if bits < 3]
        rec.reasons.append(
            "smallest, not measured: each method down to the fewest bits at which it keeps usable quality, "
            "as its backend declares (scalar codes collapse below 3 bits on most models"
            + (f"; lower: {', '.join(below)}" if below else "")
            + "; pass --results to let measurements decide); fewest stored bits per parameter wins"
        )
    else:
        rec.reasons.append(
            f"smallest, not measured: no method below {min_bits:g} bits (--min-bits); "
            "fewest stored bits per parameter wins"
        )
    return sorted(kept, key=lambda c: c.bits_per_param or 99)


def _fastest(
    cands: list[Candidate], rec: Recommendation, *, hardware: Hardware, measured: bool, max_ppl_increase: float, **_
) -> list[Candidate]:
    if measured:
        timed = [c for c in cands if c.result and c.result.decode_tokens_per_s]
        devices = {hardware_of(c.result.protocol["device"]) for c in timed if c.result.protocol}
        if devices and devices != {hardware}:
            rec.reasons.append(
                f"speeds were measured on {', '.join(d.value for d in devices)}, not "
                f"{hardware.value}: they do not transfer; using the declared formats instead"
            )
        else:
            kept = _within_quality(timed, rec, max_ppl_increase)
            rec.reasons.append("fastest: highest measured decode tokens/s wins")
            return sorted(kept, key=lambda c: -c.result.decode_tokens_per_s)
        cands = [c for c in cands if c.backend is not None]
    kept = [c for c in cands if c.nominal_bits is not None and c.nominal_bits >= 4]
    rec.reasons.append(
        "fastest, not measured (a heuristic: kernels differ; run quantkit compare on this "
        "hardware and pass --results): decoding reads every weight once per token, so at 4 bits "
        "or more the fewest stored bits per parameter wins"
    )
    return sorted(kept, key=lambda c: c.bits_per_param or 99)


def _accurate(
    cands: list[Candidate], rec: Recommendation, *, hardware: Hardware, measured: bool, **_
) -> list[Candidate]:
    eight = [c for c in cands if c.nominal_bits is not None and c.nominal_bits >= 8]
    if measured:
        key, what = _quality_key(eight)
        rec.reasons.append(f"accurate: 8-bit methods, measured: lowest {what} wins")
        return sorted(eight, key=key)
    fused = {c.method: _fused_kernels(c.backend, hardware) for c in eight}
    with_kernel = sorted({f"{c.backend.name} ({', '.join(fused[c.method])})" for c in eight if fused[c.method]})
    rec.reasons.append(
        "accurate, not measured: 8-bit weights cost well under 1 % of perplexity; methods whose layers have "
        f"a fused kernel on {hardware.value} serve them without a dequantized copy of each weight: "
        f"{', '.join(with_kernel) or '(none)'}; then the fewest stored bits"
    )
    return sorted(eight, key=lambda c: (not fused[c.method], c.bits_per_param or 99))


def _fused_kernels(backend: Backend, hardware: Hardware) -> list[str]:
    """The backend's registered kernels (the dequantize reference aside) declared for ``hardware``."""
    return [k.name for k in get_registry().kernels_of(backend) if hardware in k.devices]


def _quality_key(cands: list[Candidate]) -> tuple[Callable[[Candidate], float], str]:
    if cands and all(c.result.kl_divergence is not None for c in cands):
        return (lambda c: c.result.kl_divergence), "KL divergence from the float baseline"
    return (lambda c: c.result.perplexity), "perplexity"


def _within_quality(cands: list[Candidate], rec: Recommendation, max_ppl_increase: float) -> list[Candidate]:
    kept = [
        c for c in cands if c.result.delta_perplexity_pct is None or c.result.delta_perplexity_pct <= max_ppl_increase
    ]
    dropped = sorted({c.method for c in cands} - {c.method for c in kept})
    rec.reasons.append(
        f"quality guard: perplexity at most {max_ppl_increase:g}% above the baseline"
        + (f"; dropped {', '.join(dropped)}" if dropped else "")
    )
    return kept


def _typical_bits(backend: Backend, config) -> float | None:
    out_features, in_features = TYPICAL_LAYER
    try:
        return backend.storage_bits(config, "", out_features, in_features) / (out_features * in_features)
    except Exception:  # a format that cannot size an anonymous layer is ranked last
        return None
