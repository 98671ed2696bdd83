"""Hostile saved-model folders (issue 13): every damaged checkpoint either loads and runs, or
raises a QuantkitError naming the file, quickly and without allocating what it claims.

The mutations live in quantkit.testing.fuzz_checkpoints (shared with the longer campaign,
benchmarks/fuzz_checkpoints.py); the concrete escapes the issue found are regression tests here.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.core.empty_models import empty_model
from quantkit.testing import tiny_llama
from quantkit.testing.fuzz_checkpoints import METHODS, MUTATIONS, attempt, mutated, saved_folders

pytest.importorskip("hqq")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return saved_folders(tmp_path_factory.mktemp("saved"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutated")


@pytest.fixture
def rtn(folders, tmp_path) -> Path:
    """A private copy of the saved RTN folder, to damage."""
    return Path(shutil.copytree(folders["rtn"], tmp_path / "rtn"))


def edit_config(folder: Path, **changes) -> Path:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def refused(folder: Path, match: str) -> quantkit.ModelFormatError:
    with pytest.raises(quantkit.ModelFormatError, match=match) as raised:
        quantkit.load(folder, device="cpu")
    return raised.value


# -- the fuzzing ---------------------------------------------------------------------------


def test_every_family_on_every_saved_format(folders, scratch):
    """Seed 0 of each mutation family on each backend's folder; the unmutated folders load."""
    outcomes = {}
    for method, folder in folders.items():
        assert attempt(folder).kind == "loaded", method
        for mutation in MUTATIONS:
            outcome = attempt(mutated(folder, scratch / "sweep", mutation, 0))
            outcomes[(method, mutation.name)] = outcome.kind
            assert outcome.kind in ("loaded", "refused"), f"{method}, {mutation.name}: {outcome}"
    kinds = set(outcomes.values())
    assert kinds == {"loaded", "refused"}, kinds  # the sweep exercises both ends
    assert all(outcomes[(m, "index: valid shards")] == "loaded" for m in folders)


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(sorted(METHODS)),
    mutation=st.sampled_from(MUTATIONS),
    seed=st.integers(0, 2**20),
)
def test_mutated_folders_load_or_raise_quantkit_errors(folders, scratch, method, mutation, seed):
    outcome = attempt(mutated(folders[method], scratch / "given", mutation, seed))
    assert outcome.kind in ("loaded", "refused"), f"{method}, {mutation.name}, seed {seed}: {outcome}"
    assert outcome.seconds < 10, outcome


# -- the concrete escapes ----------------------------------------------------------


def test_deep_nesting_and_invalid_utf8_in_config(rtn):
    (rtn / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(rtn, r"config\.json.* (not valid JSON|nests deeper)")
    (rtn / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    refused(rtn, r"config\.json.*UTF-8")
    (rtn / "config.json").write_text('{"model_type": "lla')
    refused(rtn, r"config\.json.*not valid JSON")
    (rtn / "config.json").write_text("[1]")
    refused(rtn, r"config\.json.*list; expected a JSON object")


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ({"metadata": {}}, "weight_map is NoneType"),
        ({"weight_map": ["model.safetensors"]}, "weight_map is list"),
        ([1, 2], "weight_map is NoneType"),
        ({"weight_map": {"model.norm.weight": 3}}, r"weight_map\['model\.norm\.weight'\]=3"),
        ({"weight_map": {"model.norm.weight": "../rtn/model.safetensors"}}, "inside the folder"),
        ({"weight_map": {"model.norm.weight": "/etc/passwd"}}, "inside the folder"),
        (
            {"weight_map": {"model.norm.weight": "model-2.safetensors"}},
            r"names 'model-2\.safetensors', which is missing",
        ),
        ({"weight_map": {"model.nope": "model.safetensors"}}, r"weight_map\['model\.nope'\].*lacks it"),
    ],
)
def test_malformed_index(rtn, index, match):
    (rtn / "model.safetensors.index.json").write_text(json.dumps(index))
    error = refused(rtn, match)
    assert "model.safetensors" in str(error)


def test_valid_shards_load_identically(rtn, folders):
    tensors = load_file(rtn / "model.safetensors")
    (rtn / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for name, part in (("a.safetensors", keys[:7]), ("b.safetensors", keys[7:])):
        save_file({k: tensors[k] for k in part}, rtn / name)
        weight_map.update(dict.fromkeys(part, name))
    (rtn / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.arange(12)[None]
    expected = quantkit.load(folders["rtn"], device="cpu")(ids).logits
    assert torch.equal(quantkit.load(rtn, device="cpu")(ids).logits, expected)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"architectures": ["AutoConfig"]}, r"architectures\[0\]='AutoConfig' is not a transformers model class"),
        ({"architectures": ["BertModel"]}, "architectures names BertModel, which takes a BertConfig"),
        ({"architectures": "LlamaForCausalLM"}, "expected a list of class names"),
        ({"architectures": ["EvilForCausalLM"]}, "custom architectures are refused"),
        ({"auto_map": {"AutoModelForCausalLM": "evil.EvilForCausalLM"}}, "auto_map"),
        ({"model_type": "nope"}, "model_type='nope' is not a model type"),
        ({"model_type": ["llama"]}, "model_type=\\['llama'\\]"),
        ({"dtype": "Linear"}, "dtype='Linear'; allowed: float32"),
        ({"hidden_size": "64"}, "hidden_size='64'; expected a positive integer"),
        ({"num_attention_heads": 0}, "num_attention_heads=0; expected a positive integer"),
        ({"rope_parameters": {"rope_type": "nope"}}, "transformers cannot build LlamaForCausalLM from it: 'nope'"),
        ({"rope_parameters": {"rope_type": "linear"}}, "transformers refuses this llama config"),
        ({"quantization_config": {"quant_method": "rtn", "bits": "4"}}, r"config\.json.*RTNConfig\.bits='4'"),
    ],
)
def test_bad_architecture_or_values_name_the_file_and_field(rtn, changes, match):
    error = refused(edit_config(rtn, **changes), match)
    assert "config.json" in str(error)


def test_abstract_architecture_is_refused(rtn):
    """``get_input_embeddings`` of a *PreTrainedModel raises NotImplementedError (an escape before)."""
    with pytest.raises(quantkit.QuantkitError, match="LlamaPreTrainedModel"):
        quantkit.load(edit_config(rtn, architectures=["LlamaPreTrainedModel"]), device="cpu")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"num_hidden_layers": 1048576},
            "num_hidden_layers=1048576; expected a positive integer, at most the 2 layers",
        ),
        ({"vocab_size": 2**40}, "vocab_size=1099511627776"),
        ({"hidden_size": 4096, "intermediate_size": 8}, "hidden_size=4096, vocab_size=256 .* imply at least"),
        (
            {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 1048576},
            "describes a model of more than .* weights",
        ),
    ],
)
def test_huge_sizes_are_refused_before_allocating(rtn, changes, match):
    edit_config(rtn, **changes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    refused(rtn, match)
    assert time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024  # KiB: under 100 MiB more


def rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def test_damaged_safetensors_headers(rtn):
    weights = rtn / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 2**63) + original[8:])
    refused(rtn, r"model\.safetensors' is truncated or not safetensors: header length 9223372036854775808")
    weights.write_bytes(original[:5])
    refused(rtn, "header length missing")
    weights.write_bytes(original[:-1])
    refused(rtn, r"data ends at byte \d+ but the file holds \d+ data bytes")
    weights.write_bytes(original)
    rewrite_header(weights, lambda h: h["model.norm.weight"].update(data_offsets=[0, 10**12]))
    refused(rtn, r"tensor 'model\.norm\.weight': data_offsets=\[0, 1000000000000\] span")
    weights.write_bytes(original)
    rewrite_header(weights, lambda h: h["model.norm.weight"].update(dtype="F4"))
    refused(rtn, r"tensor 'model\.norm\.weight': dtype='F4'; allowed: F64")


def test_tensors_that_do_not_fit_the_architecture(rtn):
    """A consistent file whose tensor has another dtype or shape than the model's slot: refused
    before assignment (it was a RuntimeError from load_state_dict, or a model failing later)."""
    tensors = load_file(rtn / "model.safetensors")
    save_file(
        {**tensors, "model.norm.weight": tensors["model.norm.weight"].view(torch.int32)}, rtn / "model.safetensors"
    )
    refused(rtn, r"tensor 'model\.norm\.weight' is torch\.int32 \[64\]; .* expect torch\.float32 \[64\]")
    qweight = "model.layers.0.self_attn.q_proj.qweight"
    save_file({**tensors, qweight: tensors[qweight].t().contiguous()}, rtn / "model.safetensors")
    refused(rtn, rf"tensor '{qweight}' is torch\.int32 \[64, 8\]; .* expect torch\.int32 \[8, 64\]")


def test_empty_model_is_built_on_the_meta_device(folders):
    """No parameter is allocated before loading assigns the stored tensors; the computed
    non-persistent buffers (rotary inv_freq) are real and equal a fresh model's."""
    raw = json.loads((folders["rtn"] / "config.json").read_text())
    model = empty_model(raw)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fresh = tiny_llama(0, hidden=64, intermediate=128)
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
