"""The conformance suite (quantkit.testing) over every built-in backend and the example plugin,
and over deliberately broken plugins in a plugin author's plain pytest run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from quantkit import AWQConfig, BnbConfig, GGUFConfig, GPTQConfig, HQQConfig, RTNConfig
from quantkit.core.registry import get_registry
from quantkit.testing import CHECKS, conformance_tests

BUILTINS = ("bitsandbytes", "gptq", "awq", "hqq", "gguf", "rtn", "eetq", "aqlm")


@pytest.fixture(autouse=True)
def _example_plugin_installed(example_site, on_path):
    """The example plugin installed beside the built-ins, as a third party's would be."""
    on_path(example_site)


def test_every_builtin_backend_is_here_and_available():
    """The suites below cover every built-in backend, and none skips for being unavailable."""
    registry = get_registry()
    assert set(registry.builtin_backends()) == set(BUILTINS)
    assert {name: registry.backends[name].is_available().reason for name in BUILTINS} == dict.fromkeys(BUILTINS, "")
    assert "example-int8" in registry.backends


test_bitsandbytes = conformance_tests("bitsandbytes", [BnbConfig(), BnbConfig(load_in_4bit=False, load_in_8bit=True)])
# the double-quant state's JSON holds a float offset whose digits vary by a byte or two
test_bitsandbytes_double_quant = conformance_tests(
    "bitsandbytes", [BnbConfig(use_double_quant=True)], storage_rtol=1e-4
)
test_gptq = conformance_tests(
    "gptq", [GPTQConfig(bits=4, group_size=32), GPTQConfig(bits=4, group_size=32, desc_act=True)]
)
test_awq = conformance_tests("awq", [AWQConfig(group_size=32)])
test_hqq = conformance_tests("hqq", [HQQConfig(nbits=4, group_size=32)])
# storage_bits counts the ggml blocks, not the int32 ggml_type stored beside each linear's weight
test_gguf = conformance_tests(
    "gguf", [GGUFConfig(quant_type="Q4_K_M"), GGUFConfig(quant_type="Q8_0")], storage_rtol=1e-3
)
test_rtn = conformance_tests("rtn", [RTNConfig(bits=4, group_size=32)])
test_example_plugin = conformance_tests("example-int8", [{}, {"scale_dtype": "float16"}])


# -- the suite in a plugin author's repository -------------------------------------------

BROKEN_PLUGIN = '''
"""Backends each breaking one rule of the contract, on top of the example plugin."""

import os

import torch
from safetensors.torch import load_file, save_file

from quantkit import hookimpl
from quantkit_example_int8.config import AbsmaxInt8Config
from quantkit_example_int8.plugin import AbsmaxInt8Backend, AbsmaxInt8Linear


def backend(name, **overrides):
    config = type(f"{name}-config", (AbsmaxInt8Config,), {"quant_method": name})
    return type(name, (AbsmaxInt8Backend,), {"name": name, "config_class": config, **overrides})()


def miscounting_storage_bits(self, config, name, out_features, in_features):
    return out_features * in_features * 8  # forgets the scales


def noisy_quantize(self, model, config, *, calibration, device):
    model = AbsmaxInt8Backend.quantize(self, model, config, calibration=calibration, device=device)
    noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for module in model.modules():
        if isinstance(module, AbsmaxInt8Linear):
            module.scale.mul_(1 + 1e-3 * torch.rand(module.scale.shape, generator=noise))
    return model


def lossy_save_pretrained(self, model, directory):
    AbsmaxInt8Backend.save_pretrained(self, model, directory)
    path = directory / "model.safetensors"
    tensors = {k: v.half().float() if k.endswith(".scale") else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


@hookimpl
def quantkit_register_backends(register):
    register(backend("miscounting-int8", storage_bits=miscounting_storage_bits))
    register(backend("noisy-int8", quantize=noisy_quantize))
    register(backend("lossy-int8", save_pretrained=lossy_save_pretrained))
'''

AUTHOR_TESTS = """
from quantkit.testing import conformance_tests

test_example_int8 = conformance_tests("example-int8", configs=[{}, {"scale_dtype": "float16"}])
test_miscounting = conformance_tests("miscounting-int8")
test_noisy = conformance_tests("noisy-int8")
test_lossy = conformance_tests("lossy-int8")
"""

EXPECTED_FAILURES = {
    "test_example_int8": set(),
    "test_miscounting": {"storage_bits_match_saved_bytes"},
    "test_noisy": {"requantization_is_byte_identical"},
    "test_lossy": {"reload_is_exact"},
}


def test_plugin_authors_one_liner_passes_a_sound_backend_and_fails_broken_ones(example_site, tmp_path):
    """In a plain pytest run of a plugin's repository (no quantkit conftest), the one-liner
    runs every check; each broken backend fails exactly the check for the rule it breaks."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_int8.py").write_text(BROKEN_PLUGIN)
    info = site / "broken_int8-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-int8\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[quantkit]\nbroken-int8 = broken_int8\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pytest.ini").write_text("[pytest]\n")
    (repo / "test_backend.py").write_text(textwrap.dedent(AUTHOR_TESTS))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(example_site)])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_backend.py"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    outcomes = dict(
        (m.group(2), m.group(1))
        for m in re.finditer(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) test_backend\.py::(\S+)", result.stdout, re.M)
    )
    expected = {
        f"{test}[{config}-{check}]": "FAILED" if check in failing else "PASSED"
        for test, failing in EXPECTED_FAILURES.items()
        for config in (["defaults", "scale_dtype=float16"] if test == "test_example_int8" else ["defaults"])
        for check in CHECKS
        if check != "streaming_is_the_in_memory_save"  # skipped: these backends do not declare streaming
    }
    assert outcomes == expected, result.stdout[-5000:] + result.stderr[-2000:]
