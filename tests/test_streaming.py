"""Quantizing a float checkpoint streamed from disk: the same bytes as quantizing in memory,
one module's float tensors in memory at a time, damaged folders refused before any output."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import quantkit
from quantkit import streaming
from quantkit.cli.main import main
from quantkit.core import linears, shard_writer
from quantkit.core.empty_models import empty_model
from quantkit.core.errors import QuantkitError
from quantkit.core.safetensors_files import INDEX_NAME, SAFETENSORS_METADATA, WEIGHTS_NAME, read_header
from quantkit.core.streamed_checkpoints import StreamedCheckpoint
from quantkit.testing import tiny_llama, token_ids
from quantkit.testing.synthetic_checkpoints import preset_config, write_synthetic_checkpoint

CONFIGS = {
    "rtn": {"quant_method": "rtn", "bits": 4, "group_size": 32},
    "eetq": {"quant_method": "eetq"},
}
SHARD = 40_000
"""Bytes per shard in these tests: every checkpoint has several."""


def float_model(dtype: torch.dtype = torch.float32, layers: int = 2) -> torch.nn.Module:
    return tiny_llama(0, hidden=128, intermediate=256, layers=layers, outliers=False).to(dtype)


def tiny_qwen2(hidden: int = 128, intermediate: int = 256, layers: int = 2) -> torch.nn.Module:
    """A Qwen2 (q/k/v biases, untied output head) in bfloat16."""
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval().to(torch.bfloat16)


MODELS = {
    "llama-fp32": float_model,
    "llama-bf16": lambda: float_model(torch.bfloat16),
    "qwen2-bf16": tiny_qwen2,
}


@pytest.fixture
def float_folder(tmp_path) -> Path:
    """The tiny Llama (float32) saved by transformers in shards with their index."""
    folder = tmp_path / "float"
    float_model().save_pretrained(folder, max_shard_size="100KB")
    assert (folder / INDEX_NAME).is_file()
    return folder


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("architecture", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_streamed_output_is_the_in_memory_save(method, architecture, tmp_path):
    folder = tmp_path / "float"
    original = MODELS[architecture]()
    original.save_pretrained(folder, max_shard_size="100KB")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=original.dtype)  # the whole model in memory
    reference = quantkit.save(quantkit.quantize(model, CONFIGS[method], device="cpu"), tmp_path / "ref")
    out = quantkit.quantize_streaming(folder, CONFIGS[method], tmp_path / "out", max_shard_bytes=SHARD)

    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    for shard in shards:
        read_header(out / shard)  # quantkit's strict check: known dtypes, exact tiling
    expected, streamed = tensors_of(reference), tensors_of(out)
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert streamed[name].dtype == tensor.dtype and streamed[name].shape == tensor.shape, name
        assert as_bytes(streamed[name]) == as_bytes(tensor), name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in streamed.values())
    block = json.loads((reference / "config.json").read_text())["quantization_config"]
    assert json.loads((out / "config.json").read_text())["quantization_config"] == block

    ids = token_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(quantkit.load(out, "cpu")(ids).logits, quantkit.load(reference, "cpu")(ids).logits)


def test_one_shard_is_written_as_model_safetensors(float_folder, tmp_path):
    out = quantkit.quantize_streaming(float_folder, "rtn-4bit-g64", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", WEIGHTS_NAME]
    assert quantkit.load(out, "cpu").quantkit_config.group_size == 64
    # the file safetensors writes for these tensors, byte for byte (its layout: by dtype, then name)
    tensors = load_file(out / WEIGHTS_NAME)
    save_file(tensors, tmp_path / "library.safetensors", metadata=SAFETENSORS_METADATA)
    assert (out / WEIGHTS_NAME).read_bytes() == (tmp_path / "library.safetensors").read_bytes()


def test_a_cast_tensor_is_written_a_piece_at_a_time(monkeypatch, tmp_path):
    """ShardWriter.add(..., dtype): the bytes of the whole cast, each piece cast alone (no whole cast copy)."""
    monkeypatch.setattr(shard_writer, "COPY_BYTES", 1000)  # pieces of 250 float32 values
    weight = torch.randn(37, 53, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    casts = []
    original = torch.Tensor.to

    def to(tensor, *args, **kwargs):
        if any(isinstance(arg, torch.dtype) for arg in (*args, *kwargs.values())):
            casts.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    writer = shard_writer.ShardWriter(tmp_path, 10**6)
    writer.add("w", weight, torch.float32)
    writer.finish()
    monkeypatch.setattr(torch.Tensor, "to", original)
    assert max(casts) <= 250 < weight.numel()
    stored = load_file(tmp_path / WEIGHTS_NAME)["w"]
    assert stored.dtype == torch.float32 and torch.equal(stored, weight.float())


def test_float_tensors_are_read_one_module_at_a_time(monkeypatch, tmp_path):
    """Every float tensor read is tracked until freed: at no read are more alive than the
    largest module's, far less than one decoder layer's."""
    folder = tmp_path / "float"
    float_model(layers=4).save_pretrained(folder, max_shard_size="100KB")
    alive: dict[int, int] = {}
    peak = 0
    read = StreamedCheckpoint.read_tensor

    def tracked(self, name):
        nonlocal peak
        tensor = read(self, name)
        alive[id(tensor)] = tensor.numel() * tensor.element_size()
        weakref.finalize(tensor, alive.pop, id(tensor))
        peak = max(peak, sum(alive.values()))
        return tensor

    monkeypatch.setattr(StreamedCheckpoint, "read_tensor", tracked)
    quantkit.quantize_streaming(folder, CONFIGS["rtn"], tmp_path / "out", max_shard_bytes=SHARD)

    stored = tensors_of(folder)
    sizes = {name: t.numel() * t.element_size() for name, t in stored.items()}
    modules: dict[str, int] = {}
    for name, size in sizes.items():
        modules[name.rpartition(".")[0]] = modules.get(name.rpartition(".")[0], 0) + size
    layer = sum(size for name, size in sizes.items() if name.startswith("model.layers.0."))
    assert 0 < peak <= max(modules.values()) < layer < sum(sizes.values()) / 4
    assert not alive


def shard_of(folder: Path, name: str = "model.layers.1.mlp.down_proj.weight") -> Path:
    return folder / json.loads((folder / INDEX_NAME).read_text())["weight_map"][name]


def damage_missing_shard(folder: Path) -> None:
    shard_of(folder).unlink()


def damage_phantom_tensor(folder: Path) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = shard_of(folder).name
    (folder / INDEX_NAME).write_text(json.dumps(index))


def damage_truncated_shard(folder: Path) -> None:
    shard = shard_of(folder)
    shard.write_bytes(shard.read_bytes()[:-100])


def damage_config_shapes(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 192
    (folder / "config.json").write_text(json.dumps(config))


def damage_nan_weight(folder: Path) -> None:
    tensors = load_file(shard_of(folder))
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, shard_of(folder), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (damage_missing_shard, quantkit.ModelFormatError, "which is missing"),
        (damage_phantom_tensor, quantkit.ModelFormatError, "lacks it"),
        (damage_truncated_shard, quantkit.ModelFormatError, "truncated"),
        (damage_config_shapes, quantkit.ModelFormatError, "expect torch.float32 \\[192, 128\\]"),
        (damage_nan_weight, quantkit.QuantizationError, "NaN/Inf"),
    ],
)
def test_damaged_checkpoint_is_refused_and_leaves_no_output(float_folder, tmp_path, damage, error, message):
    damage(float_folder)
    with pytest.raises(error, match=message):
        quantkit.quantize_streaming(float_folder, CONFIGS["rtn"], tmp_path / "out", max_shard_bytes=SHARD)
    assert not (tmp_path / "out").exists()
    partial = tmp_path / ".out.quantkit-partial"  # kept only when it holds complete shards to resume from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"] or (partial / streaming.JOURNAL).is_file()


def test_backends_that_quantize_or_save_their_own_way_are_refused(float_folder, tmp_path):
    with pytest.raises(
        quantkit.QuantizationError, match="backends that can: awq, bitsandbytes, eetq, gguf, gptq, hqq, rtn$"
    ):
        quantkit.quantize_streaming(float_folder, {"quant_method": "aqlm"}, tmp_path / "out")
    reference = quantkit.save(quantkit.quantize(float_model(), CONFIGS["rtn"], device="cpu"), tmp_path / "ref")
    with pytest.raises(quantkit.ModelFormatError, match="quantize from the float original"):
        quantkit.quantize_streaming(reference, CONFIGS["rtn"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_synthetic_checkpoint_has_the_preset_shapes_and_scale(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "synthetic", "tiny-llama", max_shard_bytes=100_000)
    assert (folder / INDEX_NAME).is_file() and len(list(folder.glob("*.safetensors"))) > 2
    with StreamedCheckpoint(folder) as checkpoint:  # checked complete, every shape the architecture's
        assert "lm_head.weight" not in checkpoint.stored  # tied, as in Llama-3.2
    tensors = tensors_of(folder)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    weights = torch.cat([t.float().flatten() for n, t in tensors.items() if not n.endswith("norm.weight")])
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    assert all(torch.all(t == 1) for n, t in tensors.items() if n.endswith("norm.weight"))

    out = quantkit.quantize_streaming(folder, CONFIGS["rtn"], tmp_path / "out", max_shard_bytes=SHARD)
    assert quantkit.load(out, "cpu")(token_ids(1, 8)).logits.isfinite().all()


@pytest.mark.parametrize(
    ("preset", "parameters"),
    [
        ("Llama-3.2-1B", 1_235_814_400),
        ("Llama-3.2-3B", 3_212_749_824),
        ("Llama-3.1-8B", 8_030_261_248),
        ("Qwen2.5-7B", 7_615_616_512),
    ],
)
def test_presets_have_the_published_parameter_counts(preset, parameters):
    model = empty_model(preset_config(preset), source=preset)  # meta device: nothing allocated
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_quantize_command_streams(float_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", "--stream", "--model", str(float_folder), "--method", "eetq", "--out", str(out)]) == 0
    assert quantkit.load(out, "cpu").quantkit_config.quant_method == "eetq"
    assert main(["quantize", "--stream", "--method", "eetq", "--out", str(tmp_path / "x")]) == 2
    assert "--model=None is invalid; allowed: a local float checkpoint folder" in capsys.readouterr().err


QUANTIZED = streaming._quantized


class Interrupted(Exception):
    """Stands for a run killed in the middle."""


def counting_quantizer(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Count the linears quantized (and stop the run after ``fail_after`` of them)."""
    calls: list[str] = []
    quantize = QUANTIZED

    def counted(target, tensors, steps):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted
        calls.append(target.name)
        return quantize(target, tensors, steps)

    monkeypatch.setattr(streaming, "_quantized", counted)
    return calls


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_interrupted_run_resumes_after_its_last_complete_shard(float_folder, tmp_path, monkeypatch):
    whole = counting_quantizer(monkeypatch)
    reference = quantkit.quantize_streaming(float_folder, CONFIGS["rtn"], tmp_path / "ref", max_shard_bytes=SHARD)
    out = tmp_path / "out"
    counting_quantizer(monkeypatch, fail_after=len(whole) - 3)
    with pytest.raises(Interrupted):
        quantkit.quantize_streaming(float_folder, CONFIGS["rtn"], out, max_shard_bytes=SHARD)
    partial = tmp_path / ".out.quantkit-partial"
    assert not out.exists() and json.loads((partial / streaming.JOURNAL).read_text())["modules"]

    resumed = counting_quantizer(monkeypatch)
    quantkit.quantize_streaming(float_folder, CONFIGS["rtn"], out, max_shard_bytes=SHARD)
    assert 3 <= len(resumed) < len(whole) / 2  # the linears of the unfinished shard, not all of them
    assert files_of(out) == files_of(reference)
    assert not partial.exists()


def test_a_resume_with_another_config_or_a_damaged_shard_starts_over(float_folder, tmp_path, monkeypatch):
    out, partial = tmp_path / "out", tmp_path / ".out.quantkit-partial"
    whole = counting_quantizer(monkeypatch)
    reference = quantkit.quantize_streaming(float_folder, CONFIGS["eetq"], tmp_path / "ref", max_shard_bytes=SHARD)
    for change in ("config", "shard"):
        counting_quantizer(monkeypatch, fail_after=len(whole) - 2)
        config = CONFIGS["rtn"] if change == "config" else CONFIGS["eetq"]
        with pytest.raises(Interrupted):
            quantkit.quantize_streaming(float_folder, config, out, max_shard_bytes=SHARD)
        if change == "shard":
            shard = partial / json.loads((partial / streaming.JOURNAL).read_text())["shards"][0]["file"]
            shard.write_bytes(shard.read_bytes()[:-10])
        again = counting_quantizer(monkeypatch)
        quantkit.quantize_streaming(float_folder, CONFIGS["eetq"], out, max_shard_bytes=SHARD)
        assert len(again) == len(whole), change
        assert files_of(out) == files_of(reference)


def test_two_runs_into_one_output_are_refused(float_folder, tmp_path):
    partial = tmp_path / ".out.quantkit-partial"
    with streaming._claimed(partial), pytest.raises(QuantkitError, match="another quantkit run is writing"):
        quantkit.quantize_streaming(float_folder, CONFIGS["rtn"], tmp_path / "out", max_shard_bytes=SHARD)


CALIBRATED = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128},
}
CALIBRATION = token_ids(4, 64)


def saved_folder(tmp_path: Path, architecture: str, layers: int = 2) -> Path:
    """A tiny checkpoint in shards with their index: one of :data:`MODELS` saved by transformers, or
    ``synthetic``, the synthetic tiny Llama (bfloat16, Llama-3 rope scaling) written by quantkit."""
    folder = tmp_path / "float"
    if architecture == "synthetic":
        return write_synthetic_checkpoint(folder, "tiny-llama", max_shard_bytes=50_000, layers=layers)
    model = float_model(layers=layers) if architecture == "llama-fp32" else MODELS[architecture]()
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


@pytest.mark.parametrize(
    ("method", "architecture"),
    [("gptq", "synthetic"), ("gptq", "llama-fp32"), ("gptq", "qwen2-bf16"), ("awq", "llama-fp32")],
)
def test_calibrated_streamed_output_is_the_in_memory_save(method, architecture, tmp_path):
    folder = saved_folder(tmp_path, architecture, layers=1 if method == "awq" else 2)  # AWQ's searches are slow
    stored = next(iter(tensors_of(folder).values())).dtype
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=stored)  # the whole model in memory
    config = CALIBRATED[method]
    reference = quantkit.save(quantkit.quantize(model, config, calibration=CALIBRATION, device="cpu"), tmp_path / "ref")
    out = quantkit.quantize_streaming(folder, config, tmp_path / "out", calibration=CALIBRATION, max_shard_bytes=SHARD)

    assert len(list(out.glob("*.safetensors"))) > 2
    expected, streamed = tensors_of(reference), tensors_of(out)
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert streamed[name].dtype == tensor.dtype and streamed[name].shape == tensor.shape, name
        assert as_bytes(streamed[name]) == as_bytes(tensor), name
    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())


def test_calibrated_layers_are_materialised_one_at_a_time(monkeypatch, tmp_path):
    """Each time a module is materialised, the tensors alive in the model and in the float modules
    quantization replaced are at most one decoder layer's: earlier layers were written and let go."""
    folder = saved_folder(tmp_path, "llama-fp32", layers=4)
    modules: list[torch.nn.Module] = []
    peaks: list[int] = []
    materialise = StreamedCheckpoint.materialise

    def alive(checkpoint: StreamedCheckpoint) -> int:
        tensors = [p for m in modules for p in m.parameters(recurse=False)]
        tensors += checkpoint.model.state_dict().values()
        real = {(t.untyped_storage().data_ptr(), t.nbytes) for t in tensors if not t.is_meta and t.numel()}
        return sum(size for _, size in real)

    def tracked(self, module, **options):
        modules.extend(m for m in self.model.modules() if m not in modules)
        tensors = materialise(self, module, **options)
        peaks.append(alive(self))
        return tensors

    monkeypatch.setattr(StreamedCheckpoint, "materialise", tracked)
    quantkit.quantize_streaming(folder, CALIBRATED["gptq"], tmp_path / "out", calibration=CALIBRATION)

    sizes = {name: t.numel() * t.element_size() for name, t in tensors_of(folder).items()}
    layer = sum(size for name, size in sizes.items() if name.startswith("model.layers.0."))
    assert len(peaks) == 5  # the embedding, then each layer
    assert peaks[0] == sizes["model.embed_tokens.weight"] and max(peaks[1:]) == layer < sum(sizes.values()) / 4


def test_an_interrupted_calibrated_run_leaves_nothing_and_starts_over(tmp_path, monkeypatch):
    folder = saved_folder(tmp_path, "llama-fp32")
    done = streaming._StreamedLayers.done

    def interrupted(self, index, layer):
        if index == 0:  # before any layer is finished: nothing to resume (tests/test_streaming_resume_calibrated.py)
            raise Interrupted
        done(self, index, layer)

    monkeypatch.setattr(streaming._StreamedLayers, "done", interrupted)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        quantkit.quantize_streaming(folder, CALIBRATED["gptq"], out, calibration=CALIBRATION, max_shard_bytes=SHARD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]
    monkeypatch.setattr(streaming._StreamedLayers, "done", done)
    quantkit.quantize_streaming(folder, CALIBRATED["gptq"], out, calibration=CALIBRATION, max_shard_bytes=SHARD)
    assert quantkit.load(out, "cpu")(token_ids(1, 8)).logits.isfinite().all()


def test_a_nan_weight_stops_a_calibrated_run_and_leaves_no_output(float_folder, tmp_path):
    damage_nan_weight(float_folder)
    with pytest.raises(quantkit.QuantizationError, match="model.layers.1.mlp.down_proj.weight holds 1 NaN/Inf"):
        quantkit.quantize_streaming(float_folder, CALIBRATED["gptq"], tmp_path / "out", calibration=CALIBRATION)
    partial = tmp_path / ".out.quantkit-partial"  # kept only when layer 0 was finished, to resume from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"] or (partial / streaming.JOURNAL).is_file()
    assert not (tmp_path / "out").exists()


def test_weights_are_checked_finite_without_a_weight_sized_copy(monkeypatch):
    """A whole 8B embedding through ``isfinite`` would take 2.5 GiB (a float32 copy and a bool mask):
    the check reads its minimum and maximum; a failed one counts the bad values a piece at a time."""
    monkeypatch.setattr(linears, "FINITE_CHECK_ELEMENTS", 100)
    weight = torch.zeros(30, 40, dtype=torch.bfloat16)
    linears.check_finite("ok", weight)
    weight[29, 39], weight[3, 1] = float("nan"), float("inf")
    with pytest.raises(QuantkitError, match=r"bad\.weight holds 2 NaN/Inf values"):
        linears.check_finite("bad", weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 33, 4099])
def test_all_finite_finds_any_nan_or_infinity_anywhere(dtype, size):
    weight = torch.randn(size, 3).to(dtype)
    assert linears.all_finite(weight) and linears.all_finite(weight.t())
    for bad in (float("nan"), float("inf"), -float("inf")):
        for position in {0, size // 2, size - 1}:
            broken = weight.clone()
            broken[position, 2] = bad
            assert not linears.all_finite(broken) and not linears.all_finite(broken.t())
    assert linears.all_finite(torch.empty(0, 3, dtype=dtype)) and linears.all_finite(torch.ones(4, dtype=torch.int8))
