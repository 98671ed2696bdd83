"""The user surface of kernels: ``quantkit backends --kernels`` and ``quantkit compare --kernel``."""

from __future__ import annotations

import dataclasses
import json

from quantkit.cli.main import main
from quantkit.compare.protocol import Protocol


def test_backends_kernels_json_lists_each_kernel_with_its_declarations_and_availability(capsys):
    assert main(["backends", "--kernels", "--json"]) == 0
    rows = {(r["name"], tuple(r["layers"])): r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {
        ("eetq", ("EetqLinear",)),
        ("bnb-cpu", ("Bnb4bit",)),
        ("bitsandbytes", ("Bnb4bit",)),
        ("bitsandbytes", ("Bnb8bit",)),
        ("gemv-inductor", ("Bnb8bit",)),
        ("int4-cpu", ("AWQLinear",)),
        ("int4-cpu", ("GPTQLinear",)),
        ("int4-cpu", ("GGUFLinear",)),
        ("int4-cpu", ("HQQLayer",)),
        ("int4-cuda", ("AWQLinear",)),
        ("int4-cuda", ("GPTQLinear",)),
        ("int4-cuda", ("GGUFLinear",)),
        ("int4-cuda", ("HQQLayer",)),
        ("int4x2-cpu", ("GGUFLinear",)),
        ("q6k-avx512", ("GGUFLinear",)),
        ("gemv-inductor", ("AWQLinear",)),
        ("gemv-inductor", ("GPTQLinear",)),
        ("gemv-inductor", ("GGUFLinear",)),
        ("gemv-inductor", ("HQQLayer",)),
        ("int8-cpu", ("EetqLinear",)),
        ("dequantize", ()),
        ("dequantize-cached", ("GGUFLinear",)),
    }
    int4 = rows[("int4-cpu", ("GPTQLinear",))]
    assert int4["devices"] == ["cpu"] and int4["bits"] == [4] and int4["group_sizes"] == [32, 64, 128, 256]
    assert int4["compute_dtype"] == "bfloat16" and int4["available"] and int4["priority"] > 0
    assert int4["shape_limits"] == ["out_features must be a multiple of 16"]  # a ragged last group is padded
    assert "in_features must be a multiple of group_size" in rows[("int4-cpu", ("HQQLayer",))]["shape_limits"]
    eetq = rows[("eetq", ("EetqLinear",))]
    assert eetq["requires"] == ["EETQ"] and not eetq["available"] and "cuda" in eetq["reason"]
    assert rows[("dequantize", ())]["priority"] == 0 and rows[("dequantize", ())]["available"]
    cuda = rows[("int4-cuda", ("GPTQLinear",))]
    assert cuda["devices"] == ["cuda"] and cuda["group_sizes"] == [32, 64, 128, 256] and not cuda["available"]
    gemv = rows[("gemv-inductor", ("GGUFLinear",))]
    assert gemv["programs"] == ["g++"] and gemv["cpu_features"] == [] and gemv["compute_dtype"] == "float32"
    q6_k = rows[("q6k-avx512", ("GGUFLinear",))]
    assert q6_k["programs"] == ["g++", "ninja"] and "avx512_bf16" in q6_k["cpu_features"]


def test_backends_kernels_table_fits_80_columns_and_explains_why_a_kernel_cannot_run(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["backends", "--kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    names = [line.split()[0] for line in lines[3:] if line[:1].isalpha()]
    fastest_first = ["eetq", "bnb-cpu"] + ["int4-cpu"] * 4 + ["int4-cuda"] * 4 + ["int4x2-cpu", "q6k-avx512"]
    fastest_first += ["bitsandbytes"] * 2 + ["gemv-inductor"] * 5
    fastest_first += ["int8-cpu", "dequantize", "dequantize-cached"]
    assert names[: len(fastest_first)] == fastest_first
    out = " ".join(" ".join(lines).split())
    assert "eetq: no cuda device here; missing package EETQ" in out


def test_compare_kernel_is_part_of_the_protocol_only_when_given():
    default = Protocol()
    forced = dataclasses.replace(default, kernel="dequantize")
    assert "kernel" not in default.to_dict() and forced.to_dict()["kernel"] == "dequantize"
    assert forced.key() != default.key() and forced.describe().endswith("; kernel dequantize")
