"""Config dataclasses: validation, round trips, diff dicts, transformers blocks (property-based)."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantkit
from quantkit.calibration import load_text
from quantkit.core.config import _type_hints
from quantkit.core.resolve import as_config, config_from_dict, config_from_hf_dict, config_from_json_file

BUILTIN_CONFIGS = (
    quantkit.BnbConfig,
    quantkit.GPTQConfig,
    quantkit.AWQConfig,
    quantkit.HQQConfig,
    quantkit.GGUFConfig,
    quantkit.RTNConfig,
)
CONFIGS = {c.__name__: c for c in BUILTIN_CONFIGS}


def _base(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (
        (typing.get_origin(args[0]) or args[0])
        if len(args) == 1 and type(None) in typing.get_args(hint)
        else (typing.get_origin(hint) or hint)
    )


def valid_values(cls, f: dataclasses.Field) -> st.SearchStrategy:
    """Values a field accepts, derived from its declaration."""
    meta, hint = f.metadata, _type_hints(cls)[f.name]
    if meta.get("choices"):
        return st.sampled_from(meta["choices"])
    base = _base(hint)
    optional = type(None) in typing.get_args(hint)
    if base is bool:
        strategy = st.booleans()
    elif base is int:
        strategy = st.integers(-2, 4096)
    elif base is float:
        strategy = st.floats(0, 100, allow_nan=False)
    elif base is str:
        strategy = st.text(min_size=1, max_size=8)
    elif base is list:
        strategy = st.lists(st.text(min_size=1, max_size=8), max_size=3)
    else:
        return st.just({})
    if meta.get("valid"):
        strategy = strategy.filter(meta["valid"])
    return st.one_of(st.none(), strategy) if optional else strategy


CROSS_FIELD_RULES = {
    quantkit.BnbConfig: lambda kw: {**kw, "load_in_8bit": not kw["load_in_4bit"]},
}
"""Cross-field constraints (``validate()``) that per-field strategies cannot express."""


def configs(cls) -> st.SearchStrategy:
    fields = [f for f in dataclasses.fields(cls) if f.name != "module_overrides"]
    kwargs = st.fixed_dictionaries({f.name: valid_values(cls, f) for f in fields})
    return kwargs.map(CROSS_FIELD_RULES.get(cls, lambda kw: kw)).map(lambda kw: cls(**kw))


def invalid_cases(cls):
    """(field, bad value) pairs: values outside each declared choice set or range, wrong types."""
    cases = []
    for f in dataclasses.fields(cls):
        base = _base(_type_hints(cls)[f.name])
        if f.metadata.get("choices"):
            bad = "not-a-choice" if base is str else 12345
            cases.append((f.name, bad))
        elif f.metadata.get("valid") and base in (int, float):
            cases.append(
                (
                    f.name,
                    next(
                        v
                        for v in (-5, 0, 1, 2.5, 1e9)
                        if not f.metadata["valid"](v) and (base is float or isinstance(v, int))
                    ),
                )
            )
        cases.append((f.name, object()))  # a type no field accepts
    return cases


@pytest.mark.parametrize("cls", BUILTIN_CONFIGS, ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trips_are_exact(cls, data):
    config = data.draw(configs(cls))
    assert cls.from_dict(config.to_dict()) == config
    assert config_from_dict(json.loads(config.to_json_string())) == config
    assert cls.from_dict(config.to_diff_dict()) == config


@pytest.mark.parametrize("cls", BUILTIN_CONFIGS, ids=lambda c: c.__name__)
def test_diff_dict_of_defaults_is_minimal(cls):
    assert cls().to_diff_dict() == {"quant_method": cls.quant_method}


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [(cls, name, value) for cls in BUILTIN_CONFIGS for name, value in invalid_cases(cls)],
    ids=lambda v: getattr(v, "__name__", None) or (v if isinstance(v, str) else None),
)
def test_every_invalid_value_names_its_field(cls, field, value):
    with pytest.raises(quantkit.QuantkitError) as info:
        cls(**{field: value})
    assert field in str(info.value)
    assert isinstance(info.value, (ValueError, TypeError))


@pytest.mark.parametrize("cls", BUILTIN_CONFIGS, ids=lambda c: c.__name__)
@settings(max_examples=25, deadline=None)
@given(key=st.text(min_size=1, max_size=12))
def test_unknown_keys_fail_with_a_hint(cls, key):
    if key in {f.name for f in dataclasses.fields(cls)} | {"quant_method", "schema_version"}:
        return
    with pytest.raises(quantkit.UnknownFieldError, match="has no field"):
        cls.from_dict({key: 1})


def test_did_you_mean():
    with pytest.raises(quantkit.UnknownFieldError, match="did you mean 'group_size'"):
        quantkit.GPTQConfig.from_dict({"group_sise": 64})
    with pytest.raises(quantkit.UnknownMethodError, match="did you mean 'gptq'"):
        config_from_dict({"quant_method": "gtpq"})


def test_mutual_exclusion_and_ranges():
    with pytest.raises(quantkit.ConfigValueError, match="load_in_4bit"):
        quantkit.BnbConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(quantkit.ConfigValueError, match="damp_percent"):
        quantkit.GPTQConfig(damp_percent=1.0)
    with pytest.raises(quantkit.ConfigValueError, match="group_size"):
        quantkit.GPTQConfig(group_size=0)
    with pytest.raises(quantkit.ConfigTypeError, match="bits"):
        quantkit.GPTQConfig(bits=True)


def test_schema_version_is_written_and_checked():
    data = quantkit.HQQConfig().to_dict()
    assert data["schema_version"] == 1
    assert (
        quantkit.HQQConfig.from_dict({k: v for k, v in data.items() if k != "schema_version"}) == quantkit.HQQConfig()
    )
    with pytest.raises(quantkit.ConfigValueError, match="schema_version"):
        quantkit.HQQConfig.from_dict({**data, "schema_version": 99})


def test_module_overrides_validate_and_apply():
    config = quantkit.GPTQConfig(
        bits=4, module_overrides={"*.mlp.down_proj": {"bits": 8}, "model.layers.0": {"sym": False}}
    )
    assert config.for_module("model.layers.3.mlp.down_proj").bits == 8
    assert config.for_module("model.layers.0.self_attn.q_proj").sym is False
    assert config.for_module("model.layers.3.self_attn.q_proj") is config
    with pytest.raises(quantkit.ConfigValueError, match="bits"):
        quantkit.GPTQConfig(module_overrides={"*": {"bits": 5}})
    with pytest.raises(quantkit.UnknownFieldError, match="nbits"):
        quantkit.GPTQConfig(module_overrides={"*": {"nbits": 4}})
    with pytest.raises(quantkit.ConfigValueError, match="modules_to_not_convert"):
        quantkit.GPTQConfig(module_overrides={"*": {"modules_to_not_convert": []}})


def test_modules_to_not_convert_matching():
    config = quantkit.RTNConfig(modules_to_not_convert=["lm_head", "*.mlp.gate_proj", "model.layers.1"])
    assert config.skips("lm_head") and config.skips("model.lm_head")
    assert config.skips("model.layers.0.mlp.gate_proj")
    assert config.skips("model.layers.1.self_attn.q_proj")
    assert not config.skips("model.layers.10.self_attn.q_proj")


def test_short_forms():
    qlora = quantkit.as_config(True)
    assert (qlora.quant_type, qlora.use_double_quant, qlora.compute_dtype) == ("nf4", True, "bfloat16")
    assert quantkit.as_config({"quant_type": "fp4"}).quant_type == "fp4"
    assert quantkit.as_config({"quant_type": "fp4"}).use_double_quant is True
    assert isinstance(quantkit.as_config({"quant_method": "gptq", "bits": 3}), quantkit.GPTQConfig)
    assert quantkit.as_config("gguf-q4_k_m") == quantkit.GGUFConfig(quant_type="Q4_K_M")
    with pytest.raises(quantkit.UnknownFieldError):
        quantkit.as_config({"bitz": 4})
    with pytest.raises(quantkit.ConfigTypeError):
        quantkit.as_config(False)


def test_compute_dtype_accepts_torch_dtypes():
    import torch

    assert quantkit.BnbConfig(compute_dtype=torch.bfloat16).compute_dtype == "bfloat16"


@pytest.mark.parametrize(
    "config",
    [
        quantkit.BnbConfig(quant_type="nf4", use_double_quant=True, compute_dtype="bfloat16"),
        quantkit.BnbConfig(load_in_4bit=False, load_in_8bit=True, llm_int8_threshold=4.0),
        quantkit.GPTQConfig(bits=3, group_size=64, desc_act=True, sym=False, damp_percent=0.05),
        quantkit.AWQConfig(group_size=64, zero_point=False, version="gemv"),
    ],
)
def test_hf_round_trip(config):
    block = config.to_hf_dict()
    assert config_from_hf_dict(json.loads(json.dumps(block))) == config


def test_hf_blocks_transformers_accepts():
    from transformers import AwqConfig, BitsAndBytesConfig, GPTQConfig

    bnb = BitsAndBytesConfig.from_dict(quantkit.BnbConfig(use_double_quant=True).to_hf_dict())
    assert bnb.load_in_4bit and bnb.bnb_4bit_use_double_quant and bnb.bnb_4bit_quant_type == "nf4"
    gptq = GPTQConfig.from_dict(quantkit.GPTQConfig(bits=3, group_size=64).to_hf_dict())
    assert (gptq.bits, gptq.group_size) == (3, 64)
    awq = AwqConfig.from_dict(quantkit.AWQConfig(group_size=64).to_hf_dict())
    assert (awq.bits, awq.group_size) == (4, 64)


def test_legacy_bnb_block_without_quant_method():
    config = config_from_hf_dict(
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float16"}
    )
    assert config == quantkit.BnbConfig(quant_type="nf4", compute_dtype="float16")
    assert config_from_hf_dict({"load_in_8bit": True}).load_in_8bit


def test_quantkit_only_methods_have_no_hf_block():
    with pytest.raises(quantkit.ConfigValueError, match="quant_method"):
        quantkit.HQQConfig().to_hf_dict()
    assert config_from_hf_dict(quantkit.HQQConfig(nbits=2).to_dict()) == quantkit.HQQConfig(nbits=2)


def test_json_file_round_trip(tmp_path):
    config = quantkit.GGUFConfig(quant_type="Q5_K_M", modules_to_not_convert=["lm_head", "*.down_proj"])
    path = tmp_path / "c.json"
    config.to_json_file(path)
    assert config_from_json_file(path) == config
    assert quantkit.GGUFConfig.from_json_file(path) == config
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(quantkit.ModelFormatError, match="not valid JSON"):
        config_from_json_file(tmp_path / "bad.json")


def test_method_names_take_the_ecosystems_aliases_and_any_case():
    bnb = quantkit.BnbConfig()
    assert as_config("bnb") == as_config("bitsandbytes") == as_config("BNB") == bnb
    assert config_from_dict({"quant_method": "bnb"}) == config_from_dict({"quant_method": "bitsandbytes"}) == bnb
    assert config_from_dict({"quant_method": "GPTQ", "bits": 3}) == quantkit.GPTQConfig(bits=3)
    assert as_config("NF4") == as_config("nf4") and as_config("Gguf-Q4_K_M") == as_config("gguf-q4_k_m")
    assert as_config("int8") == quantkit.BnbConfig(load_in_4bit=False, load_in_8bit=True)


def test_a_width_is_not_a_method():
    for name in ("int4", "4bit", "4-bit"):
        with pytest.raises(quantkit.UnknownMethodError, match=f"'{name}' names a width, not a method") as info:
            as_config(name)
        message = str(info.value)
        assert "did you mean" not in message  # not 'int8'
        for preset in ("nf4", "fp4", "gptq-4bit-g128", "awq-4bit-g128", "gguf-q4_k_m", "hqq-4bit-g64"):
            assert preset in message.split("; registered")[0]
        assert "int8" not in message.split("; registered")[0]


def test_a_preset_is_not_a_quant_method():
    with pytest.raises(quantkit.UnknownMethodError, match="'nf4' is a preset, not a quant_method.*'bitsandbytes'"):
        config_from_dict({"quant_method": "nf4"})


def test_unknown_names_suggest_the_closest():
    with pytest.raises(quantkit.UnknownMethodError, match="did you mean 'gptq-4bit-g128'"):
        as_config("gptq-4bit-g12")
    with pytest.raises(quantkit.UnknownMethodError, match="did you mean 'bitsandbytes'"):
        config_from_dict({"quant_method": "bitsandbyte"})
    with pytest.raises(quantkit.UnknownNameError, match="dataset='wikitext' is unknown; did you mean 'wikitext2'"):
        load_text("wikitext", "calibration")
