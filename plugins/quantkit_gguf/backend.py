"""GGUF backend (being implemented)."""

from __future__ import annotations

from quantkit import Backend, Capabilities, GGUFConfig
from quantkit.capabilities import ALL_HARDWARE, Availability

# elements per block, bytes per block (ggml's layouts)
BLOCK_LAYOUT = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}


class GGUFBackend(Backend):
    name = "gguf"
    config_class = GGUFConfig
    file_suffixes = (".gguf",)
    capabilities = Capabilities(
        methods=("gguf",),
        bits=(2, 3, 4, 5, 6, 8, 16),
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=False,
        requires=("gguf",),
        description="llama.cpp GGUF tensor types and mixes in torch; .gguf export and import",
    )

    def is_available(self) -> Availability:
        return Availability(False, "not implemented yet")

    def storage_bits(self, config: GGUFConfig, name: str, out_features: int, in_features: int) -> int:
        block, size = BLOCK_LAYOUT[config.quant_type.removesuffix("_M").removesuffix("_S").removesuffix("_L")]
        return out_features * in_features // block * size * 8

    def quantize(self, model, config, *, calibration, device):
        raise NotImplementedError
