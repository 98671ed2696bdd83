"""Synthetic float checkpoints with the exact shapes of real models, written tensor by tensor.

Only SmolLM2's weights are available offline; memory and time at real sizes are measured on
these instead: the ``config.json`` of a real architecture (:data:`PRESETS`), random bfloat16
weights of a realistic scale (normal, std 0.02; norms 1.0) and the hub's layout (5 GB shards
and their index). The tensors are those of the architecture transformers builds from the
config (biases included, tied heads left out), generated one at a time and written as they
come (:class:`~quantkit.core.shard_writer.ShardWriter`): the generator never holds the model.
``benchmarks/synthetic_checkpoint.py`` is its command line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from quantkit.core.atomic import atomic_path
from quantkit.core.empty_models import empty_model
from quantkit.core.errors import ConfigValueError, UnknownNameError
from quantkit.core.serialization import CONFIG_NAME, tied_parameter_names
from quantkit.core.shard_writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter

WEIGHT_STD = 0.02

_LLAMA_3 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
_LLAMA_3_2_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

PRESETS: dict[str, dict] = {
    "Llama-3.2-1B": {
        **_LLAMA_3,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_scaling": _LLAMA_3_2_ROPE,
    },
    "Llama-3.2-3B": {
        **_LLAMA_3,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_scaling": _LLAMA_3_2_ROPE,
    },
    "Llama-3.1-8B": {
        **_LLAMA_3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_scaling": {**_LLAMA_3_2_ROPE, "factor": 8.0},
    },
    "Qwen2.5-7B": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    "tiny-llama": {
        **_LLAMA_3,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 512,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
}
"""``config.json`` of each architecture (as published on the hub, shapes exact); ``tiny-llama``
is for tests."""


STORED_DTYPES = (torch.bfloat16, torch.float16)
"""The dtypes a synthetic checkpoint is stored in."""


def preset_config(preset: str) -> dict:
    """The ``config.json`` dict of ``preset``."""
    if preset not in PRESETS:
        raise UnknownNameError("preset", preset, PRESETS, listing="synthetic checkpoint presets")
    return json.loads(json.dumps(PRESETS[preset]))


def write_synthetic_checkpoint(
    folder: str | os.PathLike,
    preset: str,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    seed: int = 0,
    layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a random checkpoint of ``preset``'s architecture into ``folder`` (atomically), one
    tensor in memory at a time; return ``folder``. ``layers`` keeps only that many decoder layers
    (every shape stays the preset's): a real architecture at a size tests can afford. ``dtype``:
    bfloat16 (the hub's) or float16 (llama.cpp's converter's F16 input)."""
    config = preset_config(preset)
    if dtype not in STORED_DTYPES:
        raise ConfigValueError("write_synthetic_checkpoint", "dtype", dtype, ", ".join(map(str, STORED_DTYPES)))
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if layers is not None:
        if type(layers) is not int or not 1 <= layers <= config["num_hidden_layers"]:
            raise ConfigValueError("write_synthetic_checkpoint", "layers", layers, f"1..{config['num_hidden_layers']}")
        config["num_hidden_layers"] = layers
    model = empty_model(config, source=preset)  # on the meta device: names and shapes only
    tied = tied_parameter_names(model)
    generator = torch.Generator().manual_seed(seed)
    with atomic_path(Path(folder), directory=True) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, meta in model.state_dict().items():
            if name not in tied:
                writer.add(name, _random_like(name, meta, generator).to(dtype))
        writer.finish()
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(folder)


def _random_like(name: str, meta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Norm weights are ones; every other tensor is normal with std :data:`WEIGHT_STD`."""
    if name.endswith("norm.weight"):
        return torch.ones(meta.shape, dtype=torch.bfloat16)
    return torch.empty(meta.shape, dtype=torch.bfloat16).normal_(0.0, WEIGHT_STD, generator=generator)
