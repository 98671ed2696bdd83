"""Plugins: the example package found through its entry point, broken plugins isolated, allow/deny lists."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.core.registry import get_registry, reset_registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "quantkit-example-plugin"
BUILTINS = {"bitsandbytes", "gptq", "rtn", "awq", "hqq", "gguf"}


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    """The example plugin installed by pip (into a private target folder)."""
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source)  # build outside the repo: no egg-info left in the tree
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    return target


@pytest.fixture
def on_path(monkeypatch):
    """Put folders on sys.path (and PYTHONPATH for subprocesses) for one test."""

    def add(folder: Path) -> None:
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
        importlib.invalidate_caches()

    return add


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit.cli.main", *args], capture_output=True, text=True)


def test_example_plugin_is_found_through_its_entry_point(example_site, on_path):
    on_path(example_site)
    result = run_cli("backends", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert BUILTINS <= set(rows)
    assert rows["example-int8"]["available"] is True
    assert rows["example-int8"]["bits"] == [8]
    assert set(rows["example-int8"]) >= {
        "name", "available", "reason", "quantize_hardware", "inference_hardware",
        "bits", "requires_calibration", "serializable", "trainable",
    }
    plugins = json.loads(run_cli("plugins", "--json").stdout)["plugins"]
    example = next(p for p in plugins if p["name"] == "example-int8")
    assert example["version"] == "0.1.0" and example["hooks"] == ["quantkit_register_backends"]


def test_example_plugin_quantizes_saves_and_loads(example_site, on_path, tiny_llama, tmp_path):
    on_path(example_site)
    config = quantkit.config_from_dict({"quant_method": "absmax-int8"})  # a plugin's config, by name
    tokens = torch.randint(0, 256, (1, 12))
    reference = tiny_llama(tokens).logits
    model = quantkit.quantize(tiny_llama, config, device="cpu")
    logits = model(tokens).logits
    assert 0 < (logits - reference).abs().max() < 0.05
    quantkit.save(model, tmp_path / "int8")
    reloaded = quantkit.load(tmp_path / "int8", device="cpu")
    assert torch.equal(reloaded(tokens).logits, logits)


def write_plugin(folder: Path, name: str, body: str) -> None:
    """A minimal installed distribution: a module plus dist-info with an entry point."""
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    info = folder / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[quantkit]\n{name} = {name}\n")


def test_plugin_failing_on_import_is_reported_and_others_work(tmp_path, on_path, tiny_llama):
    write_plugin(tmp_path, "broken_plugin", "raise RuntimeError('boom at import')\n")
    on_path(tmp_path)
    registry = get_registry()
    failure = next(f for f in registry.host.failures if f.name == "broken_plugin")
    assert failure.stage == "import" and "boom at import" in failure.reason
    assert BUILTINS <= set(registry.backends)
    rows = {r["name"]: r for r in json.loads(run_cli("backends", "--json").stdout)}
    assert rows["broken_plugin"]["available"] is False
    assert "boom at import" in rows["broken_plugin"]["reason"]


def test_plugin_failing_in_its_hook_is_isolated(tmp_path, on_path):
    write_plugin(tmp_path, "bad_hook", """
        from quantkit import hookimpl

        @hookimpl
        def quantkit_register_backends(register):
            raise ValueError("cannot register")
    """)
    on_path(tmp_path)
    registry = get_registry()
    failure = next(f for f in registry.host.failures if f.name == "bad_hook")
    assert failure.stage == "quantkit_register_backends" and "cannot register" in failure.reason
    assert BUILTINS <= set(registry.backends)


def test_misspelt_hook_is_caught(tmp_path, on_path):
    write_plugin(tmp_path, "typo_plugin", """
        from quantkit import hookimpl

        @hookimpl
        def quantkit_register_backend(register):
            pass
    """)
    on_path(tmp_path)
    failure = next(f for f in get_registry().host.failures if f.name == "typo_plugin")
    assert failure.stage == "register" and "quantkit_register_backend" in failure.reason
    assert "typo_plugin" not in dict(get_registry().host.manager.list_name_plugin())


def test_allow_and_deny_lists(monkeypatch):
    # the allow list limits third-party plugins only; a name it lists that is not installed is a failure
    monkeypatch.setenv("QUANTKIT_PLUGINS", "gptq,not-installed")
    assert set(get_registry().backends) >= BUILTINS
    assert [f.name for f in get_registry().host.failures] == ["not-installed"]
    reset_registry()
    monkeypatch.delenv("QUANTKIT_PLUGINS")
    monkeypatch.setenv("QUANTKIT_DISABLE_PLUGINS", "gguf, awq")
    assert set(get_registry().backends) == BUILTINS - {"gguf", "awq"}
    with pytest.raises(quantkit.UnknownMethodError, match="gguf"):
        get_registry().backend_for(quantkit.GGUFConfig(), quantkit.Hardware.CPU)


def test_builtin_datasets_come_through_the_hook():
    assert {"pydoc", "wikitext2", "c4", "pileval"} <= set(get_registry().datasets)
    plugins = {p.name: p for p in get_registry().host.plugins()}
    assert plugins["datasets"].hooks == ("quantkit_register_datasets",)
