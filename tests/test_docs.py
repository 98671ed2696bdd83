"""Every code block of README.md and CONTRIBUTING.md runs as written, or says why not.

Fenced ``python`` and ``bash`` blocks run, each in a fresh process in its own temporary
folder (bash with the venv's ``quantkit`` first on ``PATH``); ``toml`` blocks must parse.
A block may be preceded by one marker line, an HTML comment the rendered page hides::

    <!-- docs-test: slow -->                          run it with the slow tests
    <!-- docs-test: skip (why it cannot run here) -->
    <!-- docs-test: continues -->                     run the file's previous python block(s) first
    <!-- docs-test: replace "OLD" with "NEW" (why) --> run a reduced form (OLD must occur)

several joined by ``;``. Unmarked blocks run with the fast tests. A block in any other
language, a marker nothing follows, or one that does not parse fails
:func:`test_every_block_is_run_or_marked`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: toml blocks are listed, not parsed
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "CONTRIBUTING.md")
RUN = ("python", "bash")
PARSE = {"toml": tomllib.loads if tomllib else str}
TIMEOUT = 3600

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:(.*)-->\s*$")
ITEM = re.compile(
    r"\s*(?:(?P<slow>slow)|(?P<continues>continues)|skip \((?P<skip>[^()]+)\)"
    r'|replace "(?P<old>[^"]+)" with "(?P<new>[^"]*)" \((?P<why>[^()]+)\))\s*(?:;|$)'
)
"""One item of a marker; a reason is a parenthesis without parentheses (semicolons allowed)."""


@dataclass
class Block:
    """One fenced block and what its marker asks."""

    doc: str
    line: int
    language: str
    code: str
    slow: bool = False
    continues: bool = False
    skip: str | None = None
    replacements: list[tuple[str, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    def runnable(self) -> str:
        """The code to run: as written, with the marker's replacements applied."""
        code = self.code
        for old, new, _ in self.replacements:
            code = code.replace(old, new)
        return code


def parse_marker(text: str, block: Block) -> None:
    position, text = 0, text.strip()
    while position < len(text):
        match = ITEM.match(text, position)
        if match is None:
            block.problems.append(f"unknown docs-test marker item at {text[position:]!r}")
            return
        position = match.end()
        if match["slow"]:
            block.slow = True
        elif match["continues"]:
            block.continues = True
        elif match["skip"]:
            block.skip = match["skip"]
        else:
            block.replacements.append((match["old"], match["new"], match["why"]))


def blocks(doc: str) -> list[Block]:
    """The fenced blocks of ``doc``, each with its marker applied and its problems listed."""
    found: list[Block] = []
    lines = (REPO / doc).read_text().splitlines()
    marker: tuple[int, str] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = FENCE.match(line.strip())
        if fence is None:
            match = MARKER.match(line.strip())
            if marker is not None and line.strip():
                found.append(Block(doc, marker[0], "", "", problems=["a docs-test marker not followed by a block"]))
                marker = None
            if match:
                marker = (index + 1, match.group(1))
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
        block = Block(doc, index + 1, fence.group(1), "\n".join(lines[index + 1 : end]) + "\n")
        if marker is not None:
            parse_marker(marker[1], block)
            marker = None
        found.append(block)
        index = end + 1
    for block in found:
        block.problems += check(block, found)
    return found


def check(block: Block, found: list[Block]) -> list[str]:
    """Why ``block`` is neither run nor explicitly marked (empty when it is)."""
    problems = []
    if block.skip is not None:
        return problems if block.skip.strip() else ["skip needs a reason"]
    if block.language in PARSE:
        try:
            PARSE[block.language](block.code)
        except Exception as exc:
            problems.append(f"{block.language} block does not parse: {exc}")
    elif block.language not in RUN:
        problems.append(f"language {block.language or '(none)'!r} is neither run ({', '.join(RUN)}) nor marked skip")
    for old, _, _ in block.replacements:
        if old not in block.code:
            problems.append(f"replace: {old!r} does not occur in the block")
    if block.continues and not previous_python(block, found):
        problems.append("continues: no python block before it in the file")
    return problems


def previous_python(block: Block, found: list[Block]) -> list[Block]:
    """The chain of python blocks ``block`` continues, oldest first."""
    chain: list[Block] = []
    current = block
    while current.continues:
        earlier = [b for b in found if b.doc == current.doc and b.line < current.line and b.language == "python"]
        if not earlier:
            return []
        current = earlier[-1]
        chain.insert(0, current)
    return chain


ALL = [block for doc in DOCS for block in blocks(doc)]


def run_params(language: str) -> list:
    """One test per runnable block; a block a later one continues runs as part of that one's test."""
    continued = {id(b) for block in ALL for b in previous_python(block, ALL)}
    runnable = [b for b in ALL if b.language == language and b.skip is None and not b.problems]
    return [
        pytest.param(b, id="+".join(c.id for c in [*previous_python(b, ALL), b]), marks=[pytest.mark.slow] * b.slow)
        for b in runnable
        if id(b) not in continued
    ]


def test_every_block_is_run_or_marked():
    problems = [f"{b.id} ({b.language or 'no language'}): {p}" for b in ALL for p in b.problems]
    assert not problems, "code blocks neither run nor marked:\n" + "\n".join(problems)
    assert any(b.language == "python" for b in ALL) and any(b.language == "bash" for b in ALL)


@pytest.mark.parametrize("block", run_params("python"))
def test_python_block(block: Block, tmp_path):
    code = "".join(b.runnable() for b in [*previous_python(block, ALL), block])
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT, env=_env()
    )
    assert result.returncode == 0, f"{block.id} failed:\n{code}\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("block", run_params("bash"))
def test_bash_block(block: Block, tmp_path):
    code = block.runnable()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    assert result.returncode == 0, f"{block.id} failed:\n{code}\n{result.stdout}\n{result.stderr}"


def _env() -> dict[str, str]:
    """The venv's ``quantkit`` and ``python`` first on ``PATH``."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
