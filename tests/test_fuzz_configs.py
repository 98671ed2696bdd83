"""Hostile config input: every malformed dict, block or file ends in a QuantkitError, quickly."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantkit
from quantkit.core.config_files import MAX_DEPTH, read_config_file
from quantkit.core.registry import get_registry
from quantkit.core.resolve import as_config, config_from_dict, config_from_hf_dict, preset

BUILTIN_CONFIGS = tuple(
    sorted({b.config_class for b in get_registry().builtin_backends().values()}, key=lambda c: c.quant_method)
)
FIELDS = sorted({f.name for cls in BUILTIN_CONFIGS for f in dataclasses.fields(cls)})
HF_KEYS = [
    "quant_method",
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "llm_int8_skip_modules",
    "llm_int8_threshold",
    "bits",
    "w_bit",
    "group_size",
    "q_group_size",
    "format",
    "checkpoint_format",
    "dataset",
    "version",
    "zero_point",
    "modules_to_not_convert",
    "module_overrides",
    "quantkit_config",
    "weights",
    "num_codebooks",
    "nbits_per_codebook",
    "in_group_size",
    "out_group_size",
    "linear_weights_not_to_quantize",
]
METHODS = [c.quant_method for c in BUILTIN_CONFIGS] + ["bnb", "GPTQ", "", "nope"]
SCALE = int(os.environ.get("QUANTKIT_FUZZ_SCALE", "1"))
"""Multiplies every property test's example count: ``benchmarks/fuzz_configs.py`` runs a long campaign."""


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["nf4", "Q4_K_M", "gemm", "float32", "lm_head", "*.down_proj"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.sampled_from(FIELDS)), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.one_of(st.sampled_from(FIELDS + HF_KEYS + ["schema_version"]), st.text(max_size=8), st.integers())
dicts = st.dictionaries(keys, values, max_size=6)


def only_quantkit_errors(call, *args):
    with contextlib.suppress(quantkit.QuantkitError):
        call(*args)


@settings(max_examples=200 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.one_of(st.sampled_from(METHODS), values), data=dicts)
def test_config_from_dict_raises_only_quantkit_errors(method, data):
    only_quantkit_errors(config_from_dict, {**data, "quant_method": method})
    only_quantkit_errors(config_from_hf_dict, {**data, "quant_method": method})


@settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cls=st.sampled_from(BUILTIN_CONFIGS), data=st.one_of(dicts, values))
def test_each_config_class_raises_only_quantkit_errors(cls, data):
    only_quantkit_errors(cls.from_dict, data)
    only_quantkit_errors(cls.from_hf_dict, data)
    if isinstance(data, dict):  # the constructor with known fields (unknown keywords are Python's TypeError)
        known = {f.name for f in dataclasses.fields(cls)}
        only_quantkit_errors(lambda: cls(**{k: v for k, v in data.items() if k in known}))


@settings(max_examples=100 * SCALE, deadline=None)
@given(value=st.one_of(values, dicts), overrides=st.one_of(st.none(), dicts))
def test_names_and_short_forms_raise_only_quantkit_errors(value, overrides):
    only_quantkit_errors(as_config, value)
    if isinstance(value, str):
        only_quantkit_errors(preset, value, overrides)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"quant_method": []}, "unknown"),
        ({"quant_method": "gptq", 5: 1}, "no field 5"),
        ({"quant_method": "bitsandbytes", "llm_int8_threshold": float("inf")}, "llm_int8_threshold"),
        ({"quant_method": "gptq", "damp_percent": float("nan")}, "damp_percent"),
        ({"quant_method": "gptq", "schema_version": True}, "schema_version"),
    ],
)
def test_regressions_from_the_fuzzing_campaign(data, match):
    with pytest.raises(quantkit.QuantkitError, match=match):
        config_from_dict(data)


@pytest.mark.parametrize(
    "block",
    [
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": 5},
        {"quant_method": "gptq", "modules_to_not_convert": 5},
        {"quant_method": "awq", "module_overrides": "ab"},
        {"quant_method": "gptq", "module_overrides": {"x": 5}},
    ],
)
def test_transformers_blocks_with_wrong_types(block):
    with pytest.raises(quantkit.QuantkitError):
        config_from_hf_dict(block)


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nbits: *a9\n")
    start = time.perf_counter()
    with pytest.raises(quantkit.ModelFormatError, match="aliases"):
        read_config_file(path)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".yaml", "a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)),
        (".json", "[" * 100_000 + "]" * 100_000),
        (".json", '{"a": ' * (MAX_DEPTH + 5) + "1" + "}" * (MAX_DEPTH + 5)),
    ],
)
def test_deep_nesting_is_refused(tmp_path, suffix, text):
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    with pytest.raises(quantkit.ModelFormatError, match="deeper|not valid|parsed"):
        read_config_file(path)


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(quantkit.ModelFormatError, match="UTF-8"):
        read_config_file(path)
