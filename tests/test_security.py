"""What SECURITY.md promises: nothing in a checkpoint runs as code.

The source never unpickles (no pickle-family import, no ``torch.load``, no ``np.load`` without
``allow_pickle=False``, no ``weights_only=False``), never asks for ``trust_remote_code``, never
``eval``s/``exec``s, and parses YAML only with a safe loader; a checkpoint that offers pickled
weights or code of its own (``auto_map``) is refused without running any of it.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
from conftest import make_tiny_llama

import quantkit
from quantkit.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "quantkit").rglob("*.py"), *(ROOT / "examples").rglob("*.py")])
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "_NoAliasLoader"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain or name, else ``""``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if name in ("torch.load", "torch.jit.load", "eval", "exec") or name.endswith(
                (".unsafe_load", ".full_load", "yaml.load_all")
            ):
                found.append(f"{name}(...)")
            if name == "yaml.load" and _dotted(keywords.get("Loader", ast.Constant(None))).split(".")[-1] not in (
                SAFE_YAML_LOADERS
            ):
                found.append("yaml.load without a safe Loader")
            if name in ("np.load", "numpy.load") and not (
                isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is False
            ):
                found.append(f"{name} without allow_pickle=False")
            for flag, safe in (("trust_remote_code", False), ("weights_only", True)):
                if flag in keywords and not (isinstance(keywords[flag], ast.Constant) and keywords[flag].value is safe):
                    found.append(f"{flag}= other than {safe}")
    return found


def test_the_source_never_unpickles_runs_remote_code_or_unsafe_yaml():
    assert len(SOURCES) > 50
    found = {str(p.relative_to(ROOT)): v for p in SOURCES if (v := _violations(ast.parse(p.read_text())))}
    assert not found, f"unsafe loading (see SECURITY.md): {found}"


def test_the_rule_catches_what_it_forbids():
    hostile = [
        "import pickle",
        "from dill import loads",
        "torch.load(f)",
        "np.load(f)",
        "yaml.load(text)",
        "yaml.load(text, Loader=yaml.Loader)",
        "yaml.unsafe_load(text)",
        "AutoModel.from_pretrained(p, trust_remote_code=True)",
        "load_state_dict(f, weights_only=False)",
        "eval(source)",
    ]
    assert [line for line in hostile if not _violations(ast.parse(line))] == []
    safe = "np.load(f, allow_pickle=False)\nyaml.load(t, Loader=_NoAliasLoader)\nx.eval()\nre.compile(p)\n"
    assert _violations(ast.parse(safe)) == []


class _Payload:
    """Unpickling this touches ``marker``: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _saved(config: dict, folder: Path) -> Path:
    return quantkit.save(quantkit.quantize(make_tiny_llama(), config, device="cpu"), folder)


@pytest.fixture
def saved(tmp_path) -> Path:
    return _saved({"quant_method": "rtn", "group_size": 32}, tmp_path / "model")


@pytest.mark.parametrize(
    "config", [{"quant_method": "rtn", "group_size": 32}, {"quant_method": "hqq"}], ids=["rtn", "hqq"]
)
def test_pickled_weights_in_a_checkpoint_are_never_read(config, tmp_path):
    saved = _saved(config, tmp_path / "model")
    marker = tmp_path / "unpickled"
    (saved / "model.safetensors").unlink()
    for name in ("pytorch_model.bin", "qmodel.pt", "model.pt"):  # transformers', hqq's, torch's pickles
        (saved / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(quantkit.ModelFormatError, match="model.safetensors"):
        quantkit.load(saved)
    assert not marker.exists()


def test_remote_code_a_checkpoint_names_is_never_imported(saved, tmp_path):
    marker = tmp_path / "imported"
    (saved / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((saved / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (saved / "config.json").write_text(json.dumps(config))
    for architecture in ("LlamaForCausalLM", "EvilForCausalLM"):  # known to transformers, or only to auto_map
        config["architectures"] = [architecture]
        (saved / "config.json").write_text(json.dumps(config))
        with pytest.raises(quantkit.ModelFormatError, match="config.json"):
            quantkit.load(saved)
    assert not marker.exists()


def test_a_float_model_offering_only_pickled_weights_is_refused(tmp_path):
    folder = tmp_path / "float"
    model = make_tiny_llama()
    model.config.save_pretrained(folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(quantkit.ModelFormatError, match="could not load"):
        load_model(str(folder))
    assert not marker.exists()


def test_a_cache_variable_naming_a_file_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(quantkit.QuantkitError, match="QUANTKIT_CACHE"):
        load_model()
