"""The ``quantkit`` command line (in-process through ``main``) and the README's generated table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from quantkit.cli.backends import backend_rows, markdown_table
from quantkit.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_everywhere(capsys):
    for command in ([], ["quantize"], ["backends"], ["plugins"], ["config"], ["config", "validate"], ["estimate"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        assert "usage: quantkit" in capsys.readouterr().out


def test_backends_json_keys(capsys):
    code, out, _ = run(capsys, "backends", "--json")
    rows = json.loads(out)
    assert code == 0
    assert {r["name"] for r in rows} >= {"bitsandbytes", "gptq", "rtn", "awq", "hqq", "gguf"}
    for row in rows:
        assert set(row) == {
            "name", "available", "reason", "quantize_hardware", "inference_hardware",
            "bits", "requires_calibration", "serializable", "trainable",
        }
        assert row["available"] or row["reason"]


def test_readme_backend_table_matches_declarations():
    text = README.read_text()
    match = re.search(r"<!-- backends:start -->\n(.*?)\n<!-- backends:end -->", text, re.S)
    assert match, "README.md lacks the generated backend table"
    assert match.group(1).strip() == markdown_table(backend_rows()).strip(), (
        "README backend table is stale: regenerate it with `quantkit backends --markdown`"
    )


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
