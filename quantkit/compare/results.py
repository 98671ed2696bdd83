"""The result of one method: a typed record whose fields declare how they are shown and kept,
its JSON files, its completion against the float baseline, and the resume check.

Every view derives from :class:`Result`'s fields and their :class:`Column` (see
:func:`columns_of`): the JSON (field order, optional fields left out), the CSV (``csv``), the
Markdown report (``markdown``, ordered by ``group``), the terminal table (``terminal``
priority), the plots and ``recommend`` (the fields), and the resume key (``resume``). A new
metric is a field here and the worker line that measures it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.errors import ModelFormatError
from .methods import BASELINE, Method
from .protocol import Protocol


class Group(enum.IntEnum):
    """Where a column sits in the tables: by group, then in field order."""

    NAME = 0
    SIZE = 1
    QUALITY = 2
    SPEED = 3
    COST = 4


@dataclass(frozen=True)
class Column:
    """How a :class:`Result` field is shown and kept."""

    name: str = ""
    """The field's name (filled in from the field)."""
    label: str = ""
    """Header in the Markdown report."""
    fmt: str = "{}"
    """Format of a cell; ``None`` and NaN show as ``-``."""
    scale: float | None = None
    """Divisor applied before formatting (bytes shown in MB)."""
    group: Group | None = None
    """Place in the tables; needed by ``markdown`` and ``terminal``."""
    short: str | None = None
    """Terminal header when shorter than ``label`` (the table's legend spells it out)."""
    terminal: int | None = None
    """Priority in the terminal table: 1 is shown at any width, higher numbers are left out first."""
    markdown: bool = False
    csv: bool = False
    resume: bool = False
    """Part of the resume key: a saved result counts for a method only where these match."""
    optional: bool = False
    """Left out of the JSON while ``None`` (measured rows only, or added after the first results)."""

    def __post_init__(self) -> None:
        if (self.markdown or self.terminal is not None) and self.group is None:
            raise TypeError(f"column {self.label!r}: a table column needs a group")

    @property
    def header(self) -> str:
        """The terminal header."""
        return self.short or self.label

    def cell(self, result: Result) -> str:
        value = getattr(result, self.name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return self.fmt.format(value if self.scale is None else value / self.scale)


def column(default: Any = None, **spec: Any) -> Any:
    """A :class:`Result` field with its :class:`Column` (``default=MISSING``: a required field)."""
    return field(default=default, metadata={"column": Column(**spec)})


MB = 1e6


@dataclass(frozen=True)
class Result:
    """What the comparison knows of one method under one protocol (its JSON keys, in order).

    Rows that did not run (``status`` ``unavailable``, ``failed`` or ``pending``) carry the
    method's identity, the estimates and the reason; measurements stay ``None``.
    """

    method: str = column(dataclasses.MISSING, label="method", group=Group.NAME, terminal=1, markdown=True, csv=True)
    config: dict[str, Any] | None = column(csv=True)
    """The config's :meth:`~quantkit.QuantConfig.to_dict`; ``None`` for a float method."""
    available: bool | None = column(csv=True)
    status: str | None = column(csv=True)
    """``ok``, ``unavailable``, ``failed`` or ``pending``."""
    reason: str | None = column(csv=True)
    backend: str | None = column(csv=True)
    nominal_bits: float | None = column(csv=True)
    code_bits: float | None = column(label="code bits", fmt="{:.2f}", group=Group.SIZE, markdown=True, csv=True)
    requires_calibration: bool | None = column(csv=True)
    bits_per_param: float | None = column(
        label="bits/param", fmt="{:.3f}", group=Group.SIZE, short="bits", terminal=1, markdown=True, csv=True
    )
    """Stored bits of the quantized linears per weight, measured on the saved files."""
    estimated_bits_per_param: float | None = column(
        label="est. bits", fmt="{:.3f}", group=Group.SIZE, markdown=True, csv=True
    )
    size_bytes: int | None = column(
        label="size MB", fmt="{:.1f}", scale=MB, group=Group.SIZE, short="MB", terminal=2, markdown=True, csv=True
    )
    estimated_size_bytes: int | None = column(
        label="est. MB", fmt="{:.1f}", scale=MB, group=Group.SIZE, markdown=True, csv=True
    )
    quantized_params: int | None = column(csv=True)
    quantized_bytes: int | None = column(csv=True)
    quantize_seconds: float | None = column(
        label="quantize s", fmt="{:.1f}", group=Group.COST, short="quant s", terminal=4, markdown=True, csv=True
    )
    peak_rss_bytes: int | None = column(
        label="peak RSS MB",
        fmt="{:.1f}",
        scale=MB,
        group=Group.COST,
        short="RSS MB",
        terminal=4,
        markdown=True,
        csv=True,
    )
    rss_before_quantize_bytes: int | None = column(csv=True)
    perplexity: float | None = column(
        label="ppl", fmt="{:.5g}", group=Group.QUALITY, terminal=1, markdown=True, csv=True
    )
    """Of the median evaluation (by perplexity) where the method is evaluated more than once."""
    delta_perplexity: float | None = column(csv=True)
    delta_perplexity_pct: float | None = column(
        label="Δppl %", fmt="{:+.2f}", group=Group.QUALITY, terminal=1, markdown=True, csv=True
    )
    kl_divergence: float | None = column(
        label="KL", fmt="{:.3g}", group=Group.QUALITY, terminal=2, markdown=True, csv=True
    )
    top1_agreement: float | None = column(
        label="top-1", fmt="{:.2%}", group=Group.QUALITY, terminal=2, markdown=True, csv=True
    )
    prefill_tokens_per_s: float | None = column(
        label="prefill tok/s", fmt="{:.0f}", group=Group.SPEED, markdown=True, csv=True
    )
    decode_tokens_per_s: float | None = column(
        label="decode tok/s", fmt="{:.1f}", group=Group.SPEED, short="dec/s", terminal=3, markdown=True, csv=True
    )
    eval_seconds: float | None = column(csv=True)
    """Seconds of one evaluation (the median one where there are several)."""
    worker_seconds: float | None = column(csv=True)
    quantize_cpu_seconds: float | None = column(csv=True)
    cpu_seconds: float | None = column(csv=True)
    dtype: str | None = column()
    protocol: dict[str, Any] | None = column()
    """The :meth:`Protocol.to_dict` it was measured under."""
    protocol_key: str | None = column(resume=True)
    method_key: str | None = column(resume=True)
    """The :meth:`Method.key`, which includes its :attr:`Method.evaluations`."""
    estimate_error: str | None = column(optional=True)
    mean_nll: float | None = column(optional=True)
    scored_tokens: int | None = column(optional=True)
    environment: dict[str, Any] | None = column(optional=True)
    evaluations: int | None = column(optional=True)
    """Evaluations of a method that is not deterministic (:attr:`Method.evaluations`)."""
    perplexity_min: float | None = column(optional=True)
    """Lowest perplexity of the :attr:`evaluations`."""
    perplexity_max: float | None = column(optional=True)
    """Highest perplexity of the :attr:`evaluations`."""
    llama_cpp_prefill_tokens_per_s: float | None = column(
        optional=True, label="llama.cpp prefill tok/s", fmt="{:.0f}", group=Group.SPEED, markdown=True, csv=True
    )
    """llama.cpp's own prefill speed on the row's ``.gguf`` (GGUF rows, with ``--llama-python``)."""
    llama_cpp_decode_tokens_per_s: float | None = column(
        optional=True, label="llama.cpp decode tok/s", fmt="{:.1f}", group=Group.SPEED, markdown=True, csv=True
    )
    """llama.cpp's own decode speed on the row's ``.gguf`` (GGUF rows, with ``--llama-python``)."""
    kernels: str | None = column(optional=True, label="kernels", group=Group.SPEED, markdown=True)
    """The kernels the quantized linears ran for the speed columns (``int4-cpu x210``; a backend's
    layers with their own forward, such as bitsandbytes', by that backend's name)."""

    @classmethod
    def of(cls, method: Method, protocol: Protocol, status: str, reason: str = "", **values: Any) -> Result:
        """The result of ``method`` under ``protocol`` with its identity and keys, and ``values``."""
        identity = dict(
            method=method.name,
            config=method.to_dict()["config"],
            dtype=method.dtype,
            status=status,
            available=status != "unavailable",
            reason=reason,
            nominal_bits=method.nominal_bits,
            protocol=protocol.to_dict(),
            protocol_key=protocol.key(),
            method_key=method.key(),
            evaluations=method.evaluations,
        )
        return cls(**{**identity, **values})

    @classmethod
    def columns(cls) -> tuple[Column, ...]:
        """Every field's column, in field (JSON) order."""
        return _columns(cls)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Result:
        """A result from its JSON object (the files of every quantkit version so far)."""
        if not isinstance(data, Mapping):
            raise ModelFormatError(f"a result is a JSON object, not {type(data).__name__}")
        known = [c.name for c in cls.columns()]
        unknown = sorted(set(data) - set(known))
        if unknown or "method" not in data:
            raise ModelFormatError(
                f"a result needs a 'method' and only known keys; got {', '.join(unknown) or 'no method'} "
                f"(known: {', '.join(known)})"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every field in order, optional ones only when set."""
        return {
            c.name: getattr(self, c.name) for c in self.columns() if not (c.optional and getattr(self, c.name) is None)
        }

    @property
    def measured(self) -> bool:
        """Whether it ran to the end with a perplexity."""
        return self.status == "ok" and self.perplexity is not None

    @property
    def is_float(self) -> bool:
        """Whether the method is the model in a float dtype."""
        return self.config is None

    def against(self, baseline: Result) -> Result:
        """This result with its perplexity change against ``baseline``'s filled in."""
        if self.perplexity is None:
            return self
        delta = self.perplexity - baseline.perplexity
        return dataclasses.replace(self, delta_perplexity=delta, delta_perplexity_pct=100 * delta / baseline.perplexity)


@functools.cache
def _columns(kind: type[Result]) -> tuple[Column, ...]:
    return tuple(dataclasses.replace(f.metadata["column"], name=f.name) for f in dataclasses.fields(kind))


def columns_of(results: Sequence[Result], view: Literal["csv", "markdown", "terminal"]) -> list[Column]:
    """The columns of ``results`` (their record type's) that ``view`` shows: ``csv`` in field
    order, ``markdown`` and ``terminal`` by group, then field order; an optional column only where
    some result has it (results written before it existed render as they did)."""
    every = (type(results[0]) if results else Result).columns()
    every = tuple(c for c in every if not c.optional or any(getattr(r, c.name) is not None for r in results))
    if view == "csv":
        return [c for c in every if c.csv]
    chosen = [c for c in every if (c.markdown if view == "markdown" else c.terminal is not None)]
    return sorted(chosen, key=lambda c: c.group)


def complete(results: Sequence[Result]) -> list[Result]:
    """``results`` with their perplexity change against the measured float baseline (if any)."""
    base = next((r for r in results if r.method == BASELINE and r.measured), None)
    return list(results) if base is None else [r.against(base) for r in results]


def is_done(result: Result | None, method: Method, protocol: Protocol) -> bool:
    """A finished measurement of ``method`` under ``protocol``: ``ok``, with the same resume key."""
    if result is None or result.status != "ok":
        return False
    return belongs(result, method, protocol)


def belongs(result: Result, method: Method, protocol: Protocol) -> bool:
    """Whether ``result`` (of any status) is of ``method`` under ``protocol``: its resume key matches."""
    expected = Result.of(method, protocol, "ok")
    return all(getattr(result, c.name) == getattr(expected, c.name) for c in Result.columns() if c.resume)


# -- files --------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_result(path: Path, result: Result) -> None:
    """Save one method's result (``OUT/results/<method>.json``)."""
    write_json_atomic(path, result.to_dict())


def read_result(path: Path) -> Result | None:
    """The result saved at ``path``; ``None`` when missing or unreadable (the method is measured again)."""
    try:
        return Result.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, ModelFormatError):
        return None


def write_results(path: Path, results: Sequence[Result]) -> None:
    """Save every method's result as one JSON list (``results.json``, ``--json``)."""
    write_json_atomic(path, [r.to_dict() for r in results])


def load_results(path: str | os.PathLike) -> list[Result]:
    """The results of a ``quantkit compare --json`` (or ``OUT/results.json``) file."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"results file {os.fspath(path)!r} could not be read: {exc}") from exc
    if not isinstance(rows, list):
        raise ModelFormatError(f"{os.fspath(path)!r} is not a quantkit compare results list")
    try:
        return [Result.from_dict(r) for r in rows]
    except ModelFormatError as exc:
        raise ModelFormatError(f"{os.fspath(path)!r}: {exc}") from exc
