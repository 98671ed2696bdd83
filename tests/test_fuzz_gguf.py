"""Hostile .gguf input: every mutated file loads to a valid model or raises a QuantkitError, quickly and small.

The mutators live in :mod:`quantkit.testing.fuzz_gguf` (shared with ``benchmarks/fuzz_gguf.py``,
the longer campaign); the seeds are tiny Llamas exported by quantkit's GGUF export.
"""

from __future__ import annotations

import struct
import time
from dataclasses import replace

import numpy as np
import pytest
from conftest import make_tiny_llama
from gguf import GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gguf_export import tiny_tokenizer

import quantkit
from quantkit import GGUFConfig
from quantkit.builtin_backends.gguf.header import read_header
from quantkit.core.errors import ModelFormatError
from quantkit.models import load_model
from quantkit.testing.fuzz_gguf import (
    KV,
    Outcome,
    assemble,
    encode,
    random_mutation,
    run_case,
    split,
    structured_mutations,
)

SECONDS = 10.0
MEMORY = 256 * 2**20


def load(path):
    return quantkit.load(path, device="cpu")


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """A Q8_0 tiny Llama with a byte-level BPE tokenizer, as quantkit exports it."""
    path = tmp_path_factory.mktemp("seed") / "tiny.gguf"
    model = make_tiny_llama(hidden=64, intermediate=128, layers=2, vocab=400)
    model = quantkit.quantize(model, GGUFConfig(quant_type="Q8_0"))
    quantkit.save(model, path, tokenizer=tiny_tokenizer())
    return path.read_bytes()


@pytest.fixture
def case(tmp_path):
    def run(data: bytes, reader=load) -> Outcome:
        return run_case(reader, data, tmp_path / "case.gguf", seconds=SECONDS, memory_bytes=MEMORY)

    return run


def with_value(data: bytes, key: str, value: bytes) -> bytes:
    pieces = split(data)
    kvs = tuple(kv if kv.key != key.encode() else replace(kv, value=value) for kv in pieces.kvs)
    assert kvs != pieces.kvs, f"the seed has no {key}"
    return assemble(replace(pieces, kvs=kvs))


def test_split_and_assemble_round_trip(seed, case):
    assert assemble(split(seed)) == seed
    assert case(seed).kind == "loaded"


def test_every_structured_mutation_loads_or_is_refused(seed, case):
    """Truncation at every region boundary, type swaps and hostile values of known keys, huge
    counts and lengths, offsets past the end, duplicated keys and tensors."""
    wrong = []
    seen = 0
    for mutation in structured_mutations(seed):
        seen += 1
        outcome = case(mutation.data)
        if outcome.kind not in ("loaded", "refused") or (mutation.must_refuse and outcome.kind == "loaded"):
            wrong.append(f"{mutation.name}: {outcome.kind} {outcome.detail[:200]}")
    assert seen > 500
    assert not wrong, "\n".join(wrong)


@settings(
    max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_random_mutations_load_or_are_refused(seed, case, mutation_seed, edits):
    outcome = case(random_mutation(seed, mutation_seed, edits=edits))
    assert outcome.kind in ("loaded", "refused"), outcome.detail


# -- the campaign's findings, one by one ----------------------------------------------


REGRESSIONS = {
    "block_count as a string": ("llama.block_count", encode(GGUFValueType.STRING, "2"), "llama.block_count='2'"),
    "head_count=0": ("llama.attention.head_count", encode(GGUFValueType.UINT32, 0), "head_count=0"),
    "embedding_length=1": ("llama.embedding_length", encode(GGUFValueType.UINT32, 1), "embedding_length=1"),
    "file_type a list": (
        "general.file_type",
        encode(GGUFValueType.ARRAY, [7, 7], GGUFValueType.UINT32),
        "general.file_type=",
    ),
    "block_count=1048576": ("llama.block_count", encode(GGUFValueType.UINT32, 2**20), "block_count=1048576"),
    "feed_forward_length=16777216": (
        "llama.feed_forward_length",
        encode(GGUFValueType.UINT32, 2**24),
        "feed_forward_length",
    ),
    "block_count=2147483647": ("llama.block_count", encode(GGUFValueType.UINT32, 2**31 - 1), "block_count=2147483647"),
}


@pytest.mark.parametrize("reader", ["quantkit.load", "load_model"])
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_campaign_findings_are_refused_fast_and_small(seed, case, name, reader):
    key, value, shown = REGRESSIONS[name]
    outcome = case(with_value(seed, key, value), load if reader == "quantkit.load" else lambda p: load_model(p)[0])
    assert outcome.kind == "refused", outcome.detail
    assert "ModelFormatError" in outcome.detail and "case.gguf" in outcome.detail and shown in outcome.detail
    assert outcome.seconds < 2 and outcome.memory_growth < 64 * 2**20


def test_a_huge_array_count_costs_nothing(seed, tmp_path):
    """gguf-py's GGUFReader spends seconds on an array count of 2**40 in a 170 kB file."""
    data = seed
    pieces = split(data)
    pos = 24
    for kv in pieces.kvs:
        if kv.key == b"tokenizer.ggml.token_type":
            break
        pos += 8 + len(kv.key) + len(kv.value)
    count_at = pos + 8 + len(b"tokenizer.ggml.token_type") + 8
    assert struct.unpack_from("<Q", data, count_at)[0] == 400
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:count_at] + struct.pack("<Q", 2**40) + data[count_at + 8 :])
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=r"length of array 'tokenizer.ggml.token_type'=1099511627776 exceeds"):
        read_header(bad)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"general.alignment": encode(GGUFValueType.UINT32, 24)}, "general.alignment=24"),
        ({"general.alignment": encode(GGUFValueType.UINT64, 32)}, "general.alignment=32 (uint64)"),
        ({"tokenizer.ggml.token_type": encode(GGUFValueType.ARRAY, [1] * 400, GGUFValueType.UINT8)}, "array[int32]"),
        ({"tokenizer.ggml.padding_token_id": encode(GGUFValueType.UINT32, 400)}, "outside the vocabulary 0..399"),
        ({"llama.attention.layer_norm_rms_epsilon": encode(GGUFValueType.FLOAT32, float("nan"))}, "finite positive"),
        ({"llama.rope.dimension_count": encode(GGUFValueType.UINT32, 15)}, "must be even"),
        ({"tokenizer.ggml.merges": encode(GGUFValueType.ARRAY, ["ab"], GGUFValueType.STRING)}, "separated by a space"),
    ],
)
def test_inconsistent_metadata_names_the_key_value_and_bound(seed, tmp_path, change, message):
    pieces = split(seed)
    kvs = list(pieces.kvs)
    for key, value in change.items():
        kvs = [kv for kv in kvs if kv.key != key.encode()] + [KV(key.encode(), value)]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(assemble(replace(pieces, kvs=tuple(kvs))))
    with pytest.raises(ModelFormatError, match="bad.gguf") as raised:
        quantkit.load(bad)
    assert message in str(raised.value)


def test_other_architectures_get_their_counts_checked_before_transformers(tmp_path):
    """The CLI's path reads any architecture through transformers: block and embedding counts come first."""
    from gguf import GGUFWriter

    path = tmp_path / "qwen2.gguf"
    writer = GGUFWriter(path, "qwen2")
    writer.add_block_count(2**31 - 1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=r"qwen2\.block_count=2147483647 but the file holds tensors for 1 block"):
        load_model(path)
    assert time.perf_counter() - start < 2
