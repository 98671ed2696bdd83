"""Plugins: the example package found through its entry point, broken plugins isolated and
reported, name clashes refused, commands added, allow/deny lists, the suite with plugins installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.core.hardware import Hardware
from quantkit.core.registry import get_registry, reset_registry
from quantkit.core.resolve import preset

REPO = Path(__file__).resolve().parents[1]
BUILTINS = {"bitsandbytes", "gptq", "rtn", "awq", "hqq", "gguf", "eetq", "aqlm"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantkit.cli.main", *args],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )


def test_example_plugin_is_found_through_its_entry_point(example_site, on_path):
    on_path(example_site)
    result = run_cli("backends", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) >= BUILTINS
    assert rows["example-int8"]["available"] is True
    assert rows["example-int8"]["bits"] == [8]
    assert set(rows["example-int8"]) >= {
        "name",
        "available",
        "reason",
        "quantize_hardware",
        "inference_hardware",
        "bits",
        "requires_calibration",
        "serializable",
        "trainable",
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
    assert set(registry.backends) >= BUILTINS
    result = run_cli("backends", "--json")
    assert result.returncode == 1  # the table still prints, with the failure in it
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) >= BUILTINS
    assert rows["broken_plugin"]["available"] is False
    assert "boom at import" in rows["broken_plugin"]["reason"]
    assert "boom at import" in result.stderr  # and a warning says so
    # a method the broken plugin would have provided: the error names the plugin and why it failed
    result = run_cli("quantize", "--method", "broken-int8", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "'broken-int8' is unknown" in result.stderr and "'broken_plugin' (import)" in result.stderr
    assert "boom at import" in result.stderr


def test_plugin_failing_in_its_hook_is_isolated_and_listed_once(tmp_path, on_path):
    write_plugin(
        tmp_path,
        "bad_hook",
        """
        from quantkit import hookimpl

        @hookimpl
        def quantkit_register_backends(register):
            raise ValueError("cannot register")
    """,
    )
    on_path(tmp_path)
    registry = get_registry()
    failure = next(f for f in registry.host.failures if f.name == "bad_hook")
    assert failure.stage == "quantkit_register_backends" and "cannot register" in failure.reason
    assert set(registry.backends) >= BUILTINS
    assert "bad_hook" not in {p.name for p in registry.host.plugins()}
    result = run_cli("plugins", "--json")
    assert result.returncode == 1
    listing = json.loads(result.stdout)
    assert "bad_hook" not in {p["name"] for p in listing["plugins"]}
    assert [f["name"] for f in listing["failures"]] == ["bad_hook"]
    result = run_cli("plugins")
    rows = [line for line in result.stdout.splitlines() if line.startswith("bad_hook")]
    assert result.returncode == 1 and len(rows) == 1 and "cannot register" in " ".join(result.stdout.split())
    result = run_cli("backends")
    rows = [line for line in result.stdout.splitlines() if line.startswith(("bad_hook", "(1) bad_hook"))]
    assert result.returncode == 1 and len(rows) == 2  # its row and its note
    assert "cannot register" in " ".join(result.stdout.split())


def test_misspelt_hook_is_caught(tmp_path, on_path):
    write_plugin(
        tmp_path,
        "typo_plugin",
        """
        from quantkit import hookimpl

        @hookimpl
        def quantkit_register_backend(register):
            pass
    """,
    )
    on_path(tmp_path)
    failure = next(f for f in get_registry().host.failures if f.name == "typo_plugin")
    assert failure.stage == "register" and "quantkit_register_backend" in failure.reason
    assert "typo_plugin" not in dict(get_registry().host.manager.list_name_plugin())


def test_allow_and_deny_lists(monkeypatch):
    # the allow list limits third-party plugins only; a name it lists that is not installed is a failure
    monkeypatch.setenv("QUANTKIT_PLUGINS", "gptq,not-installed")
    registry = get_registry()
    assert set(registry.backends) == set(registry.builtin_backends()) == BUILTINS  # no third party's
    assert [(f.name, f.stage) for f in registry.host.failures] == [("not-installed", "environment")]
    reset_registry()
    monkeypatch.delenv("QUANTKIT_PLUGINS")
    monkeypatch.setenv("QUANTKIT_DISABLE_PLUGINS", "gguf, awq")
    assert set(get_registry().builtin_backends()) == BUILTINS - {"gguf", "awq"}
    with pytest.raises(quantkit.UnknownMethodError, match="gguf"):
        get_registry().backend_for(quantkit.GGUFConfig(), quantkit.Hardware.CPU)
    # a name the deny list gives that no plugin has is reported, with the installed names
    reset_registry()
    monkeypatch.setenv("QUANTKIT_DISABLE_PLUGINS", "gguff")
    (failure,) = get_registry().host.failures
    assert failure.name == "gguff" and "did you mean 'gguf'" in failure.reason and "bnb" in failure.reason
    assert set(get_registry().builtin_backends()) == BUILTINS


@pytest.mark.parametrize("allow", ["quanto", "nope", ""])
def test_an_allow_list_never_drops_the_builtins(monkeypatch, allow):
    monkeypatch.setenv("QUANTKIT_PLUGINS", allow)
    registry = get_registry()
    assert set(registry.builtin_backends()) == BUILTINS and set(registry.commands) >= {"quantize", "backends"}
    assert [f.name for f in registry.host.failures] == ([allow] if allow else [])


def test_allow_list_naming_no_installed_plugin_is_loud_on_the_command_line():
    result = run_cli("backends", env={"QUANTKIT_PLUGINS": "nope"})
    assert result.returncode == 1
    for backend in BUILTINS:
        assert backend in result.stdout
    assert "nope" in result.stdout and "no such plugin is installed" in result.stderr


def test_builtin_datasets_come_through_the_hook():
    assert {"pydoc", "wikitext2", "c4", "pileval"} <= set(get_registry().datasets)
    plugins = {p.name: p for p in get_registry().host.plugins()}
    assert plugins["datasets"].hooks == ("quantkit_register_datasets",)


HELLO_PLUGIN = """
    from quantkit import Command, hookimpl

    def configure(parser):
        parser.add_argument("--name", default="world")

    def run(args):
        print(f"hello, {args.name}")
        return 0

    @hookimpl
    def quantkit_register_commands(register):
        register(Command("hello", "say hello", configure, run))
"""


def test_plugin_adds_a_command(tmp_path, on_path):
    write_plugin(tmp_path, "hello_plugin", HELLO_PLUGIN)
    on_path(tmp_path)
    result = run_cli("hello", "--name", "quantkit")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello, quantkit\n", "")
    assert "say hello" in run_cli("--help").stdout
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "--json").stdout)["plugins"]}
    assert plugins["hello_plugin"]["hooks"] == ["quantkit_register_commands"]
    assert plugins["hello_plugin"]["builtin"] is False and plugins["cli"]["builtin"] is True
    result = run_cli("helo")
    assert result.returncode == 2 and "did you mean 'hello'" in result.stderr


def test_quantkits_own_commands_come_through_the_hook():
    plugins = {p.name: p for p in get_registry().host.plugins()}
    assert plugins["cli"].hooks == ("quantkit_register_commands",) and plugins["cli"].builtin
    assert list(get_registry().commands)[:8] == [  # first: quantkit's own plugins register first
        "quantize",
        "backends",
        "plugins",
        "config",
        "estimate",
        "compare",
        "recommend",
        "finetune",
    ]


def test_a_command_name_already_taken_is_refused_and_the_plugin_dropped(tmp_path, on_path):
    write_plugin(
        tmp_path,
        "squatter",
        """
        from quantkit import Backend, Capabilities, Command, RTNConfig, hookimpl
        from quantkit.core.capabilities import ALL_HARDWARE

        class Squat(Backend):
            name = "squat"
            config_class = RTNConfig  # a second backend for rtn: allowed, it takes rtn's config class
            capabilities = Capabilities(quantize_hardware=ALL_HARDWARE, inference_hardware=ALL_HARDWARE,
                                        requires_calibration=False, serializable=False, trainable=False)

            def quantize(self, model, config, *, calibration, device):
                return model

            def storage_bits(self, config, name, out_features, in_features):
                return 0

        @hookimpl
        def quantkit_register_backends(register):
            register(Squat())

        @hookimpl
        def quantkit_register_commands(register):
            register(Command("extra", "registered before the clash", print, print))
            register(Command("quantize", "mine now", print, print))
    """,
    )
    on_path(tmp_path)
    registry = get_registry()
    (failure,) = registry.host.failures
    assert (failure.name, failure.stage) == ("squatter", "quantkit_register_commands")
    assert "command 'quantize' is registered twice (first by quantkit's own plugin 'cli')" in failure.reason
    # everything the failed plugin registered is gone, its backend too; quantkit's command stays
    assert "squat" not in registry.backends and "extra" not in registry.commands
    assert registry.commands["quantize"].help == "quantize a model and save it"
    result = run_cli("quantize", "--help")
    assert result.returncode == 0 and "--calibration" in result.stdout
    assert "squatter" in result.stderr and "registered twice" in result.stderr  # loud on every command
    result = run_cli("plugins")
    assert result.returncode == 1 and "registered twice" in " ".join(result.stdout.split())


def test_a_plugin_config_taking_a_builtin_quant_method_is_refused(tmp_path, on_path):
    write_plugin(
        tmp_path,
        "gptq_clone",
        """
        from dataclasses import dataclass
        from typing import ClassVar

        from quantkit import ALL_HARDWARE, Backend, Capabilities, Preset, QuantConfig, hookimpl

        @dataclass
        class CloneConfig(QuantConfig):
            quant_method: ClassVar[str] = "gptq"

        class Clone(Backend):
            name = "gptq-clone"
            config_class = CloneConfig
            presets = (Preset("clone-4bit"),)
            capabilities = Capabilities(quantize_hardware=ALL_HARDWARE, inference_hardware=ALL_HARDWARE,
                                        requires_calibration=False, serializable=False, trainable=False)

            def quantize(self, model, config, *, calibration, device):
                return model

            def storage_bits(self, config, name, out_features, in_features):
                return 0

        @hookimpl
        def quantkit_register_backends(register):
            register(Clone())
    """,
    )
    on_path(tmp_path)
    registry = get_registry()
    (failure,) = registry.host.failures
    assert failure.name == "gptq_clone"
    assert "quant_method='gptq'" in failure.reason and "must choose its own quant_method" in failure.reason
    # the built-in keeps its method, its config class and its presets
    assert isinstance(preset("gptq-4bit-g128"), quantkit.GPTQConfig)
    assert quantkit.config_from_dict({"quant_method": "gptq"}) == quantkit.GPTQConfig()
    assert registry.backend_for(quantkit.GPTQConfig(), Hardware.CPU).name == "gptq"
    assert [b.name for b in registry.backends_for_method("gptq")] == ["gptq"]
    # the plugin is listed once, as failed, with the reason; its own names say where they went
    listing = json.loads(run_cli("plugins", "--json").stdout)
    assert "gptq_clone" not in {p["name"] for p in listing["plugins"]}
    assert [f["name"] for f in listing["failures"]] == ["gptq_clone"]
    assert "must choose its own quant_method" in listing["failures"][0]["reason"]
    with pytest.raises(quantkit.UnknownMethodError, match="'clone-4bit' comes from plugin 'gptq_clone', which failed"):
        preset("clone-4bit")


TRAINABLE_PLUGIN = """
    from dataclasses import dataclass
    from typing import ClassVar

    from quantkit import ALL_HARDWARE, Backend, Capabilities, QuantConfig, hookimpl

    @dataclass
    class ExtraConfig(QuantConfig):
        quant_method: ClassVar[str] = "extra-trainable"

    class Extra(Backend):
        name = "extra-trainable"
        config_class = ExtraConfig
        capabilities = Capabilities(quantize_hardware=ALL_HARDWARE, inference_hardware=ALL_HARDWARE,
                                    requires_calibration=False, serializable=False, trainable=True)

        def quantize(self, model, config, *, calibration, device):
            return model

        def storage_bits(self, config, name, out_features, in_features):
            return 16 * out_features * in_features

    @hookimpl
    def quantkit_register_backends(register):
        register(Extra())
"""

BUILTIN_ONLY_TESTS = (
    "tests/test_cli.py::test_help_everywhere",
    "tests/test_cli.py::test_readme_backend_table_matches_declarations",
    "tests/test_cli.py::test_backends_json_keys",
    "tests/test_cli.py::test_backends_table_fits_80_columns",
    "tests/test_plugins.py::test_quantkits_own_commands_come_through_the_hook",
    "tests/test_plugins.py::test_allow_and_deny_lists",
    "tests/test_plugins.py::test_an_allow_list_never_drops_the_builtins",
    "tests/test_backend_template.py::test_declarations_of_the_builtin_backends",
    "tests/test_finetune.py::test_every_trainable_backend_has_a_smollm2_finetune_test",
    "tests/test_finetune.py::test_trainable_backends_are_the_declared_ones",
)
"""Tests about quantkit's own backends and commands, which a third party's must not break."""


def test_the_suite_holds_with_third_party_backends_installed(example_site, tmp_path, on_path):
    on_path(example_site)
    write_plugin(tmp_path, "extra_trainable", TRAINABLE_PLUGIN)
    write_plugin(tmp_path, "hello_plugin", HELLO_PLUGIN)
    on_path(tmp_path)
    registry = get_registry()
    assert {"example-int8", "extra-trainable"} <= set(registry.backends) and not registry.host.failures
    assert "hello" in registry.commands
    assert set(registry.builtin_backends()) == BUILTINS
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *BUILTIN_ONLY_TESTS],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{len(BUILTIN_ONLY_TESTS) + 2} passed" in result.stdout  # the allow-list test has three cases


def test_no_backend_at_all_is_loud():
    # every built-in disabled, and no third party's
    env = {"QUANTKIT_DISABLE_PLUGINS": "aqlm,awq,bnb,eetq,gguf,gptq,hqq,rtn", "QUANTKIT_PLUGINS": ""}
    result = run_cli("backends", env=env)
    assert result.returncode == 1 and "no backend is registered" in result.stderr
