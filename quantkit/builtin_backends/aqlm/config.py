"""AQLM's config and presets (importable without the aqlm library)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from quantkit.core.config import CalibratedConfig, spec
from quantkit.core.errors import ConfigValueError
from quantkit.core.presets import Preset

MAX_CODEBOOK_VALUES = 2**24
"""Memory budget of one linear's codebooks, in values (32 MiB as float16): ``num_codebooks *
2**nbits_per_codebook * in_group_size * out_group_size`` may not exceed it."""

POSITIVE = dict(valid=lambda v: v > 0, allowed="a positive int")


@dataclass
class AQLMConfig(CalibratedConfig):
    """AQLM (Egiazarian et al., 2024): each ``out_group_size x in_group_size`` block of a weight
    is the sum of ``num_codebooks`` codewords, one from each learned codebook of
    ``2**nbits_per_codebook`` entries, times a per-output-group scale.

    The four format fields carry transformers' ``AqlmConfig`` names; the others steer the
    calibration (the paper's: beam search over codes minimising the layer's output error on the
    calibration inputs, alternating with Adam updates of codebooks and scales).
    """

    quant_method: ClassVar[str] = "aqlm"
    hf_quant_method: ClassVar[str] = "aqlm"

    in_group_size: int = spec(8, **POSITIVE, hf="in_group_size")
    out_group_size: int = spec(1, **POSITIVE, hf="out_group_size")
    num_codebooks: int = spec(1, valid=lambda v: 1 <= v <= 16, allowed="1..16", hf="num_codebooks")
    nbits_per_codebook: int = spec(
        16, valid=lambda v: 1 <= v <= 16, allowed="1..16 (codes are stored as int8 or int16)", hf="nbits_per_codebook"
    )
    beam_size: int = spec(8, **POSITIVE, doc="hypotheses kept by the beam search over codes")
    rounds: int = spec(2, **POSITIVE, doc="alternations of beam search and codebook/scale updates")
    codebook_steps: int = spec(100, valid=lambda v: v >= 0, allowed="an int >= 0", doc="Adam steps per round")
    codebook_lr: float = spec(1e-4, valid=lambda v: v > 0, allowed="a positive float", doc="Adam's learning rate")
    kmeans_iters: int = spec(100, **POSITIVE, doc="iterations of each residual k-means of the initialisation")
    kmeans_points_per_centroid: int | None = spec(
        None, **POSITIVE, doc="fit each k-means on this many sampled points per centroid; None: on all"
    )
    seed: int = spec(0, valid=lambda v: v >= 0, allowed="an int >= 0", doc="seed of the k-means initialisation")

    def validate(self) -> None:
        if self.codebook_values > MAX_CODEBOOK_VALUES:
            fitting = MAX_CODEBOOK_VALUES // (self.num_codebooks * self.in_group_size * self.out_group_size)
            raise ConfigValueError(
                type(self).__name__,
                "nbits_per_codebook",
                self.nbits_per_codebook,
                f"at most {fitting.bit_length() - 1} with num_codebooks={self.num_codebooks}, "
                f"in_group_size={self.in_group_size}, out_group_size={self.out_group_size}: the codebooks of one "
                f"linear (num_codebooks * 2**nbits_per_codebook * in_group_size * out_group_size values) must fit "
                f"the budget of {MAX_CODEBOOK_VALUES} values",
            )

    @property
    def codebook_values(self) -> int:
        """Values in one linear's codebooks: ``num_codebooks * 2**nbits_per_codebook * group size``."""
        return self.num_codebooks * 2**self.nbits_per_codebook * self.in_group_size * self.out_group_size

    @property
    def code_bits(self) -> float:
        """Bits of codes per weight: ``num_codebooks * nbits_per_codebook / group size``."""
        return self.num_codebooks * self.nbits_per_codebook / (self.in_group_size * self.out_group_size)

    @classmethod
    def bit_widths(cls) -> tuple[float, ...]:
        return (1.0, 2.0, 4.0)

    @classmethod
    def hf_values(cls, values: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        """transformers names the float linears by their weights (``lm_head.weight``) or modules."""
        skipped = data.get("linear_weights_not_to_quantize") or []
        if not isinstance(skipped, list) or not all(isinstance(name, str) for name in skipped):
            raise ConfigValueError(cls.__name__, "linear_weights_not_to_quantize", skipped, "a list of weight names")
        modules = dict.fromkeys(name.removesuffix(".weight") for name in skipped)
        values["modules_to_not_convert"] = [m for m in modules if m != "model.embed_tokens"] or ["lm_head"]
        return values


BUDGET = {
    "nsamples": 16,
    "seqlen": 512,
    "beam_size": 1,
    "rounds": 1,
    "codebook_steps": 20,
    "codebook_lr": 1e-3,
    "kmeans_iters": 10,
    "kmeans_points_per_centroid": 32,
}
"""Calibration settings that keep a SmolLM2-135M run under 30 minutes on 2 CPU cores with AVX-512
(2x8 116 s, 1x16 541 s: ``benchmarks/results/aqlm_quality.txt``); the paper's are the config's defaults."""

PRESETS = (
    Preset(
        "aqlm-2x8",
        {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8, **BUDGET},
        75,
        "AQLM 2x8 (~2 bits, aqlm's CPU kernel) at settings that fit a 30-minute CPU budget",
    ),
    Preset(
        "aqlm-1x16",
        {"num_codebooks": 1, "nbits_per_codebook": 16, "in_group_size": 8, **BUDGET},
        76,
        "AQLM 1x16 (~2 bits on large models, the paper's headline; its 2**16 x 8 float16 codebook per linear makes "
        "18.6 stored bits per weight on SmolLM2-135M) at settings that fit a 30-minute CPU budget",
    ),
)
