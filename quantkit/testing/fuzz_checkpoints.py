"""Hostile saved-model folders: structured mutations of small quantized checkpoints, and a
harness that loads each one and classifies what happened.

``tests/test_fuzz_checkpoints.py`` and ``benchmarks/fuzz_checkpoints.py`` share these. A
mutation takes a copy of a folder written by ``quantkit.save`` and damages one thing:
``config.json`` (truncation, invalid UTF-8, deep nesting, type swaps, huge counts, unknown
architectures or model types, ``auto_map``), the safetensors index (added, then its
``weight_map`` or file names broken), or a safetensors file (truncated at the header/data
boundaries, a huge or wrong header length, header entries with bad dtypes, shapes or offsets,
or consistent files whose tensors do not fit the architecture). :func:`attempt` loads the
result and runs one forward: each input must load and run, or raise a ``QuantkitError``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..api import load, quantize, save
from ..core.empty_models import SIZE_FIELDS
from ..core.errors import QuantkitError
from .models import tiny_llama, token_ids

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

METHODS: dict[str, dict] = {
    "rtn": {"quant_method": "rtn", "bits": 4, "group_size": 32},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32},
    "awq": {"quant_method": "awq", "group_size": 32},
    "hqq": {"quant_method": "hqq", "nbits": 4, "group_size": 32},
    "bnb-nf4": {"quant_method": "bitsandbytes", "use_double_quant": True},
    "bnb-int8": {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True},
}
"""The saved folders mutated: every built-in folder format, quantized from the same tiny Llama."""

OUTCOMES = ("loaded", "refused", "escaped", "hung", "memory")
"""What an attempt ends in: loaded (and ran a forward), refused with a ``QuantkitError``, any
other exception (an escape), past the time limit, or past the memory limit."""

SIZE_KEYS = (*SIZE_FIELDS, "max_position_embeddings")
HUGE = (0, -1, 1, 3, 7, 1048576, 2**31, 2**40, 10**30, 2**63)
ODD_VALUES = (None, True, False, -1, 0, 1.5, float("nan"), "x", "", [], {}, [1], {"a": 1}, 2**70, "float32")
ARCHITECTURES = (
    [],
    ["Nope"],
    ["AutoConfig"],
    ["PreTrainedModel"],
    ["BertModel"],
    ["GPT2LMHeadModel"],
    ["MistralForCausalLM"],
    ["LlamaModel"],
    ["LlamaForSequenceClassification"],
    ["LlamaPreTrainedModel"],
    ["__class__"],
    ["os.system"],
    ["TFLlamaForCausalLM"],
    [1],
    "LlamaForCausalLM",
    None,
)
MODEL_TYPES = ("nope", "", None, 5, ["llama"], "bert", "mistral", "gpt2", "LLAMA", "__init__")
DTYPE_NAMES = ("int8", "Linear", "float8", "complex64", "bool", "", 7, "float16", "bfloat16", "auto")
SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "I32", "I64", "U8", "I8", "BOOL", "F4", "Q4_0", "", 3)


@dataclass(frozen=True)
class Mutation:
    """One way of damaging a saved folder; ``apply(folder, rng)`` edits the copy in place."""

    name: str
    apply: Callable[[Path, random.Random], None]


@dataclass(frozen=True)
class Outcome:
    kind: str
    detail: str = ""
    seconds: float = 0.0


# -- the folders ------------------------------------------------------------------------


def saved_folders(root: Path, methods: tuple[str, ...] = tuple(METHODS)) -> dict[str, Path]:
    """A tiny Llama quantized by each method (calibrated ones on random tokens), saved under ``root``."""
    folders = {}
    for method in methods:
        config = METHODS[method]
        calibration = token_ids(8, 64, seed=1) if config["quant_method"] in ("gptq", "awq") else None
        model = tiny_llama(0, hidden=64, intermediate=128)
        folders[method] = save(quantize(model, dict(config), calibration=calibration, device="cpu"), root / method)
    return folders


def mutated(source: Path, target: Path, mutation: Mutation, seed: int) -> Path:
    """A copy of ``source`` at ``target`` with ``mutation`` applied (``seed`` picks its details)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    mutation.apply(target, random.Random(seed))
    return target


def attempt(folder: Path, *, seconds: float = 20.0, memory_bytes: int = 2 * 2**30) -> Outcome:
    """Load ``folder`` and run one forward, within ``seconds`` and ``memory_bytes`` more address space."""
    start = time.perf_counter()
    try:
        with _time_limit(seconds), _memory_limit(memory_bytes):
            model = load(folder, device="cpu")
            with torch.inference_mode():
                model(token_ids(1, 8, seed=2))
    except QuantkitError as exc:
        return Outcome("refused", f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - start)
    except _Hung:
        return Outcome("hung", f"over {seconds} s", time.perf_counter() - start)
    except MemoryError as exc:
        return Outcome("memory", f"MemoryError: {exc}"[:300], time.perf_counter() - start)
    except Exception as exc:  # the point of the harness: anything else is an escape, recorded
        kind = "memory" if "alloc" in str(exc).lower() and "memory" in str(exc).lower() else "escaped"
        return Outcome(kind, f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - start)
    return Outcome("loaded", "", time.perf_counter() - start)


class _Hung(BaseException):
    """Raised by the alarm of :func:`_time_limit` (a BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def ring(_signum, _frame):
        raise _Hung

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _memory_limit(extra: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra`` bytes (soft limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        current = int(statm.read().split()[0]) * resource.getpagesize()
    cap = current + extra if hard == resource.RLIM_INFINITY else min(current + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# -- helpers over a folder ---------------------------------------------------------------


def _config(folder: Path) -> dict:
    return json.loads((folder / CONFIG).read_text())


def _write_config(folder: Path, raw: dict) -> None:
    (folder / CONFIG).write_text(json.dumps(raw))


def _edit_config(edit: Callable[[dict, random.Random], None]) -> Callable[[Path, random.Random], None]:
    def apply(folder: Path, rng: random.Random) -> None:
        raw = _config(folder)
        edit(raw, rng)
        _write_config(folder, raw)

    return apply


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _split_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join_header(path: Path, header: dict, payload: bytes, *, raw: bytes | None = None) -> None:
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def _edit_header(edit: Callable[[dict, random.Random], None]) -> Callable[[Path, random.Random], None]:
    """A mutation editing the header of one safetensors file (its data left as it is)."""

    def apply(folder: Path, rng: random.Random) -> None:
        path = rng.choice(_weight_files(folder))
        header, payload = _split_header(path)
        edit(header, rng)
        _join_header(path, header, payload)

    return apply


def _tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _edit_tensors(edit: Callable[[dict, random.Random], None]) -> Callable[[Path, random.Random], None]:
    """A mutation rewriting one safetensors file consistently, its tensors edited by ``edit``."""

    def apply(folder: Path, rng: random.Random) -> None:
        path = rng.choice(_weight_files(folder))
        tensors = load_file(path)
        edit(tensors, rng)
        save_file(tensors, path, metadata={"format": "pt"})

    return apply


# -- config.json -------------------------------------------------------------------------


def _truncate_config(folder: Path, rng: random.Random) -> None:
    data = (folder / CONFIG).read_bytes()
    (folder / CONFIG).write_bytes(data[: rng.randrange(len(data))])


def _invalid_utf8(folder: Path, rng: random.Random) -> None:
    data = (folder / CONFIG).read_bytes()
    at = rng.randrange(len(data))
    (folder / CONFIG).write_bytes(data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]) + data[at:])


def _deep_nesting(folder: Path, rng: random.Random) -> None:
    depth = rng.choice([65, 1000, 100_000])
    key = rng.choice(["architectures", "quantization_config", "rope_parameters", "extra"])
    text = json.dumps({**_config(folder), key: None})
    nested = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
    (folder / CONFIG).write_text(text.replace(f'"{key}": null', f'"{key}": {nested}'))


def _huge_count(raw: dict, rng: random.Random) -> None:
    raw[rng.choice(SIZE_KEYS)] = rng.choice(HUGE)


def _type_swap(raw: dict, rng: random.Random) -> None:
    block = raw["quantization_config"] if rng.random() < 0.3 else raw
    block[rng.choice(sorted(block))] = rng.choice(ODD_VALUES)


def _drop_key(raw: dict, rng: random.Random) -> None:
    del raw[rng.choice(sorted(raw))]


def _architecture(raw: dict, rng: random.Random) -> None:
    raw["architectures"] = rng.choice(ARCHITECTURES)


def _model_type(raw: dict, rng: random.Random) -> None:
    raw["model_type"] = rng.choice(MODEL_TYPES)


def _auto_map(raw: dict, rng: random.Random) -> None:
    raw["auto_map"] = {"AutoModelForCausalLM": rng.choice(["evil.Model", "modeling_evil.EvilForCausalLM"])}
    if rng.random() < 0.5:
        raw["architectures"] = ["EvilForCausalLM"]


def _dtype(raw: dict, rng: random.Random) -> None:
    raw[rng.choice(["dtype", "torch_dtype"])] = rng.choice(DTYPE_NAMES)


def _rope(raw: dict, rng: random.Random) -> None:
    raw["rope_parameters"] = rng.choice(
        [{"rope_type": "nope"}, {"rope_type": "linear"}, {"rope_theta": -1.0, "rope_type": "default"}, [], "x", None]
    )


def _json_value(folder: Path, rng: random.Random) -> None:
    (folder / CONFIG).write_text(rng.choice(["[]", "null", "1", '"x"', "1" * 5000, "{}", '{"quantization_config": 1}']))


# -- the index ---------------------------------------------------------------------------


def _shard(folder: Path, rng: random.Random) -> dict:
    """Split ``model.safetensors`` into two shards with a valid index; return the index."""
    tensors = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    keys = sorted(tensors)
    cut = rng.randrange(1, len(keys))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (keys[:cut], keys[cut:]), strict=True):
        save_file({k: tensors[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    index["weight_map"] = weight_map
    (folder / INDEX).write_text(json.dumps(index))
    return index


def _valid_shards(folder: Path, rng: random.Random) -> None:
    _shard(folder, rng)


def _bad_index(folder: Path, rng: random.Random) -> None:
    index = _shard(folder, rng)
    weight_map = index["weight_map"]
    key = rng.choice(sorted(weight_map))
    choice = rng.randrange(12)
    if choice == 0:
        del index["weight_map"]
    elif choice == 1:
        index["weight_map"] = rng.choice([[], "x", None, 3, [["a", "b"]]])
    elif choice == 2:
        weight_map[key] = rng.choice([None, 3, [], {}, True])
    elif choice == 3:
        weight_map[key] = rng.choice(["../model.safetensors", "/etc/passwd", "sub/../../x.safetensors", "..", "/"])
    elif choice == 4:
        weight_map[key] = "model-00009-of-00009.safetensors"
    elif choice == 5:
        weight_map[key] = next(n for n in sorted(set(weight_map.values())) if n != weight_map[key])
    elif choice == 6:
        del weight_map[key]
    elif choice == 7:
        weight_map["model.not_a_tensor"] = weight_map[key]
    elif choice == 8:
        index = rng.choice([[], None, "x", 1])
    elif choice == 9:
        weight_map[key] = rng.choice(["C:\\x.safetensors", "x\\..\\..\\y.safetensors", "model\0.safetensors", "~/x"])
    elif choice == 10:
        (folder / INDEX).write_text("{" * 100_000)
        return
    else:
        (folder / INDEX).write_bytes(b'{"weight_map": {"\xff": 1}}')
        return
    (folder / INDEX).write_text(json.dumps(index))


# -- the safetensors files ----------------------------------------------------------------


def _truncate_weights(folder: Path, rng: random.Random) -> None:
    path = rng.choice(_weight_files(folder))
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    boundary = 8 + length
    at = rng.choice([0, 4, 7, 8, 9, boundary // 2, boundary - 1, boundary, boundary + 1, len(data) - 1])
    at = rng.choice([at, rng.randrange(len(data))])
    path.write_bytes(data[:at])


def _header_length(folder: Path, rng: random.Random) -> None:
    path = rng.choice(_weight_files(folder))
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    value = rng.choice([2**64 - 1, 2**63, 2**40, len(data), len(data) - 8, length + 1, length - 1, length + 8, 0, 1])
    path.write_bytes(struct.pack("<Q", max(0, value)) + data[8:])


def _header_entry(header: dict, rng: random.Random) -> None:
    key = rng.choice(_tensor_keys(header))
    entry = header[key]
    choice = rng.randrange(10)
    if choice == 0:
        entry["dtype"] = rng.choice(SAFETENSORS_DTYPES)
    elif choice == 1:
        odd_shapes = [[], [0], [-1], [2**62, 2**62], ["a"], None, [1.5], [True], list(reversed(entry["shape"]))]
        entry["shape"] = rng.choice(odd_shapes)
    elif choice == 2:
        begin, end = entry["data_offsets"]
        odd_offsets = [[begin, end + 10**12], [end, begin], [0, end - begin], [-1, end], [begin], None, [begin, "x"]]
        entry["data_offsets"] = rng.choice(odd_offsets)
    elif choice == 3:
        del header[key]
    elif choice == 4:
        header[key + ".extra"] = dict(entry)
    elif choice == 5:
        header[key] = rng.choice([None, [], "x", 1])
    elif choice == 6:
        header["__metadata__"] = rng.choice([None, [], {"format": 1}, "x"])
    elif choice == 7:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 8:
        entry["shape"] = [math.prod(entry["shape"]) * 2]
    else:
        header[rng.choice(["", "\u00ff", "model.layers.99999999.x"])] = dict(entry)


def _header_bytes(folder: Path, rng: random.Random) -> None:
    path = rng.choice(_weight_files(folder))
    header, payload = _split_header(path)
    text = json.dumps(header).encode()
    choice = rng.randrange(4)
    if choice == 0:
        at = rng.randrange(len(text))
        raw = text[:at] + bytes([rng.randrange(256)]) + text[at + 1 :]
    elif choice == 1:
        raw = b"\xff\xfe" + text
    elif choice == 2:
        raw = b"[" * 100_000 + b"]" * 100_000
    else:
        raw = rng.choice([b"[]", b"null", b"1", b'"x"', b"{}", b""])
    _join_header(path, header, payload, raw=raw)


def _misfit_tensor(tensors: dict, rng: random.Random) -> None:
    """Consistent file, tensors that do not fit the architecture or the quantized layout."""
    key = rng.choice(sorted(tensors))
    tensor = tensors[key]
    choice = rng.randrange(9)
    if choice == 0:
        tensors[key] = tensor.reshape(-1)
    elif choice == 1 and tensor.dim() == 2:
        tensors[key] = tensor.t().contiguous()
    elif choice == 2 and tensor.element_size() == 4:
        tensors[key] = tensor.view(rng.choice([torch.int32, torch.float32]))
    elif choice == 3:
        tensors[key] = tensor.to(rng.choice([torch.float16, torch.int64, torch.uint8, torch.bfloat16]))
    elif choice == 4 and tensor.numel() > 1:
        tensors[key] = tensor[: tensor.shape[0] // 2].contiguous()
    elif choice == 5:
        del tensors[key]
    elif choice == 6:
        tensors[key.rpartition(".")[0] + ".surplus"] = tensor.clone()
    elif choice == 7:
        tensors[key + "_renamed"] = tensors.pop(key)
    else:
        tensors[key] = torch.cat([tensor.reshape(-1), tensor.reshape(-1)])


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("config: truncated", _truncate_config),
    Mutation("config: invalid UTF-8", _invalid_utf8),
    Mutation("config: deep nesting", _deep_nesting),
    Mutation("config: huge or odd count", _edit_config(_huge_count)),
    Mutation("config: type swap", _edit_config(_type_swap)),
    Mutation("config: key removed", _edit_config(_drop_key)),
    Mutation("config: architectures", _edit_config(_architecture)),
    Mutation("config: model_type", _edit_config(_model_type)),
    Mutation("config: auto_map", _edit_config(_auto_map)),
    Mutation("config: dtype", _edit_config(_dtype)),
    Mutation("config: rope", _edit_config(_rope)),
    Mutation("config: not an object", _json_value),
    Mutation("index: valid shards", _valid_shards),
    Mutation("index: broken", _bad_index),
    Mutation("safetensors: truncated", _truncate_weights),
    Mutation("safetensors: header length", _header_length),
    Mutation("safetensors: header entry", _edit_header(_header_entry)),
    Mutation("safetensors: header bytes", _header_bytes),
    Mutation("safetensors: misfit tensor", _edit_tensors(_misfit_tensor)),
)
"""Every mutation family, in a fixed order."""
