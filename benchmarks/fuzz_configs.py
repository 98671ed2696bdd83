"""A long fuzzing campaign over configs: the suite's property tests at many times their example count.

    python benchmarks/fuzz_configs.py              # 50x the suite's examples
    python benchmarks/fuzz_configs.py --scale 200

It runs ``tests/test_fuzz_configs.py`` (``config_from_dict``, ``from_hf_dict``, every built-in
config class, names and presets, on random and structured dicts) with ``QUANTKIT_FUZZ_SCALE`` set,
and prints hypothesis' own count of the inputs each property tried and how each test ended. An
input escapes when it raises anything but a ``QuantkitError``: hypothesis then fails the test and
prints the smallest such input, which this summary shows.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50, help="multiplier of the suite's example counts")
    args = parser.parse_args()
    env = {**os.environ, "QUANTKIT_FUZZ_SCALE": str(args.scale)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"]
    start = time.perf_counter()
    run = subprocess.run(
        [*command, "tests/test_fuzz_configs.py"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    print(f"# python benchmarks/fuzz_configs.py --scale {args.scale}")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end, {seconds:.0f} s")
    tried = 0
    statistics = re.compile(r"::(\w+):\s+- during generate phase.*?(\d+) passing, (\d+) failing", re.S)
    for name, passing, failing in statistics.findall(run.stdout):
        print(f"{name}: {passing} inputs each a valid config or a QuantkitError, {failing} escaped")
        tried += int(passing) + int(failing)
    print(f"total property inputs: {tried}")
    print(run.stdout.strip().splitlines()[-1])
    if run.returncode:
        print(run.stdout[-4000:])
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
