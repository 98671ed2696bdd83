"""Testing helpers for quantkit backends: the conformance suite and the tiny model it runs on.

In a backend plugin's tests (the plugin installed, so that its entry point registers it)::

    from quantkit.testing import conformance_tests

    test_my_backend = conformance_tests("my-backend", configs=[{}, {"bits": 4}])

:mod:`quantkit.testing.conformance` describes the checks.
"""

import pytest

pytest.register_assert_rewrite("quantkit.testing.conformance")

from .conformance import (  # noqa: E402
    CHECKS,
    assert_storage_bits_match,
    conformance_tests,
    frozen_tensors,
    lora_trains,
    predicted_storage_bits,
)
from .models import tiny_llama, token_ids  # noqa: E402

__all__ = [
    "CHECKS",
    "assert_storage_bits_match",
    "conformance_tests",
    "frozen_tensors",
    "lora_trains",
    "predicted_storage_bits",
    "tiny_llama",
    "token_ids",
]
