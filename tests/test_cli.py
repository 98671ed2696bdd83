"""The ``quantkit`` command line (in-process through ``main``) and the README's generated table."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from quantkit.cli.backends import backend_rows, markdown_table, print_table
from quantkit.cli.commands import COMMANDS
from quantkit.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_everywhere(capsys):
    commands = [[], *([name] for name in COMMANDS), ["config", "validate"]]
    for command in commands:
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        assert "usage: quantkit" in capsys.readouterr().out


def test_unknown_command_names_the_closest(capsys):
    code, _, err = run(capsys, "quantise", "--method", "nf4")
    assert code == 2 and "command='quantise' is unknown; did you mean 'quantize'?" in err


def test_backends_json_keys(capsys):
    code, out, _ = run(capsys, "backends", "--json")
    rows = json.loads(out)
    assert code == 0
    assert {r["name"] for r in rows} >= {"bitsandbytes", "gptq", "rtn", "awq", "hqq", "gguf"}
    for row in rows:
        assert set(row) == {
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
        assert row["available"] or row["reason"]


def test_readme_backend_table_matches_declarations():
    text = README.read_text()
    match = re.search(r"<!-- backends:start -->\n(.*?)\n<!-- backends:end -->", text, re.S)
    assert match, "README.md lacks the generated backend table"
    assert match.group(1).strip() == markdown_table(backend_rows(builtin_only=True)).strip(), (
        "README backend table is stale: regenerate it with `QUANTKIT_PLUGINS= quantkit backends --markdown` "
        "(the empty allow list leaves third-party plugins out)"
    )


def test_backends_table_fits_80_columns():
    rows = backend_rows() + [
        {
            **backend_rows()[0],
            "name": "a-rather-long-backend-name",
            "available": False,
            "reason": "missing package(s): some_library_with_a_long_name, another_one [cuda]",
        },
        {
            "name": "broken-plugin",
            "available": False,
            "reason": "plugin failed at import: RuntimeError: boom",
            "quantize_hardware": [],
            "inference_hardware": [],
            "bits": [],
            "requires_calibration": None,
            "serializable": None,
            "trainable": None,
        },
    ]
    console = Console(width=80, file=io.StringIO(), color_system=None)
    print_table(rows, console)
    text = console.file.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    rule = next(i for i, line in enumerate(lines) if line.startswith("───"))
    header = " ".join(lines[1:rule]).split()  # after the title: the headers, wrapped between words only
    assert sorted(header) == sorted(
        ["backend", "ready", "bits", "quantize", "on", "runs", "on", "calib.", "saves", "LoRA"]
    )
    names = [line.split()[0] for line in lines[rule + 1 :] if line and not line.startswith(" ")]
    assert names[: len(rows)] == [r["name"] for r in rows]  # every name whole, on its own row
    assert "(1) a-rather-long-backend-name: missing package(s)" in text and "another_one [cuda]" in text
    assert "(2) broken-plugin: plugin failed at import: RuntimeError: boom" in text
    assert "all: cuda, rocm, mps, cpu" in " ".join(text.split())  # the legend of the abbreviation


def test_backends_json_and_markdown_are_unchanged_by_the_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    code, out, _ = run(capsys, "backends", "--markdown")
    assert code == 0 and out.strip() == markdown_table(backend_rows()).strip()
    code, out, _ = run(capsys, "backends", "--json")
    assert code == 0 and json.loads(out) == backend_rows()


def test_estimate_command(capsys):
    code, out, _ = run(capsys, "estimate", "--params", "7B", "--method", "nf4", "--double-quant", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["bits_per_param"] == pytest.approx(4.127, abs=1e-3)
    assert row["total_gb"] == pytest.approx(7e9 * row["bits_per_param"] / 8 / 1e9)
    code, out, _ = run(capsys, "estimate", "--params", "7B")
    assert code == 0 and "fp32" in out and "gptq-4bit-g128" in out


def test_config_validate(capsys, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("quant_method: gptq\nbits: 3\ngroup_size: 64\n")
    code, out, _ = run(capsys, "config", "validate", str(good))
    assert code == 0 and json.loads(out)["bits"] == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"quant_method": "gptq", "bits": 5}))
    code, _, err = run(capsys, "config", "validate", str(bad))
    assert code == 2 and "GPTQConfig.bits=5" in err and "allowed: 2, 3, 4, 8" in err


def test_quantize_rejects_bad_overrides_before_loading_a_model(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", "--method", "gptq", "--set", "bitz=4", "--out", str(tmp_path / "x"))
    assert code == 2 and "did you mean 'bits'" in err
    code, _, err = run(capsys, "quantize", "--method", "nope", "--out", str(tmp_path / "x"))
    assert code == 2 and "quant_method='nope' is unknown" in err


def test_method_names_resolve_helpfully(capsys):
    for method in ("bnb", "bitsandbytes", "BNB", "nf4", "NF4"):
        code, out, _ = run(capsys, "estimate", "--params", "7B", "--method", method, "--json")
        assert code == 0 and json.loads(out)[0]["method"] == method
    code, _, err = run(capsys, "estimate", "--params", "7B", "--method", "int4")
    assert code == 2 and "'int4' names a width, not a method" in err and "nf4" in err and "gptq-4bit-g128" in err
    assert "did you mean" not in err
    code, _, err = run(capsys, "estimate", "--params", "7B", "--method", "gptq-4bit-g12")
    assert code == 2 and "did you mean 'gptq-4bit-g128'?" in err
