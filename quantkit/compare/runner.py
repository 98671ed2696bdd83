"""The parent of a comparison: it schedules one worker process per method and files the results.

Every method runs in a fresh worker (``python -m quantkit.compare JOB``) so that its peak
memory is its own and a crash costs only that method. A worker's result is written to
``OUT/results/<method>.json`` atomically; a rerun skips methods whose result matches the
current protocol and method, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigValueError, QuantkitError
from ..estimate import estimate
from ..models import default_model_folder
from .methods import BASELINE, Method, backend_for
from .protocol import Protocol
from .results import Result, belongs, complete, is_done, read_result, write_json_atomic, write_result
from .worker import EVENT_PREFIX


@dataclass
class RunPaths:
    """Where a comparison keeps its files."""

    root: Path

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def result(self, name: str) -> Path:
        return self.results / f"{name}.json"

    def reference(self, protocol: Protocol) -> Path:
        return self.root / f"reference-logprobs-{protocol.key()}.npy"


@dataclass
class Event:
    """Progress of a method: ``start``, a worker's stage (with ``done`` of ``total`` steps),
    then ``done``, ``failed``, ``unavailable`` or ``skipped`` (measured by an earlier run)."""

    method: str
    stage: str
    done: int = 0
    total: int = 0


@dataclass
class Comparison:
    """A comparison of ``methods`` under ``protocol`` kept in ``out``.

    :meth:`run` measures the methods not yet done, each in its own worker, and
    returns every method's result (measured, unavailable or failed). One run at a
    time per ``out``: a run first removes what a killed one left behind.
    """

    methods: list[Method]
    protocol: Protocol
    out: Path
    force: bool = False
    keep_models: bool = False
    keep_reference: bool = False
    on_event: Callable[[Event], None] | None = None
    paths: RunPaths = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.paths = RunPaths(self.out)
        if not self.methods or self.methods[0].name != BASELINE or not self.methods[0].is_float:
            raise ConfigValueError(
                "Comparison",
                "methods",
                [m.name for m in self.methods],
                f"a list starting with the float baseline {BASELINE!r}",
            )

    def pending(self) -> list[Method]:
        """Methods without a finished result for this protocol (all with ``force``)."""
        if self.force:
            return list(self.methods)
        return [m for m in self.methods if not is_done(read_result(self.paths.result(m.name)), m, self.protocol)]

    def run(self) -> list[Result]:
        """Measure the pending methods; a crash or interrupt loses only the method in flight."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        write_json_atomic(self.out / "protocol.json", {"key": self.protocol.key(), **self.protocol.to_dict()})
        estimates = _estimates(self.methods, self.protocol)
        pending = self.pending()
        for method in self.methods:
            if method not in pending:
                self._emit(Event(method.name, "skipped"))
        runnable = []
        for method in pending:
            reason = _availability(method, self.protocol)
            if reason is None:
                runnable.append(method)
                continue
            result = Result.of(method, self.protocol, "unavailable", reason, **estimates.get(method.name, {}))
            write_result(self.paths.result(method.name), result)
            self._emit(Event(method.name, "unavailable"))
        reference = self.paths.reference(self.protocol)
        baseline = self.methods[0]
        if any(m is not baseline for m in runnable) and not reference.is_file() and baseline not in runnable:
            runnable.insert(0, baseline)  # the baseline's log-probabilities are needed again
        for method in runnable:
            self._measure(method, estimates.get(method.name, {}))
        if not self.keep_reference and all(r.status in ("ok", "unavailable") for r in self.results()):
            reference.unlink(missing_ok=True)
        return self.results()

    def _remove_leftovers(self) -> None:
        """Delete what a killed run left behind: scratch saves, half-written log-probs, job files."""
        for pattern in (".save-*", ".reference-logprobs-*.tmp.npy", ".job-*.json"):
            for path in self.out.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def results(self) -> list[Result]:
        """Every method's latest result under this protocol (a placeholder if none), completed
        against the float baseline."""
        results = []
        for m in self.methods:
            r = read_result(self.paths.result(m.name))
            if r is None or not belongs(r, m, self.protocol):
                r = Result.of(m, self.protocol, "pending", "not measured yet")
            results.append(r)
        return complete(results)

    def _measure(self, method: Method, estimate: dict[str, Any]) -> None:
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        job = {
            "method": method.to_dict(),
            "protocol": self.protocol.to_dict(),
            "result": str(self.paths.result(method.name)),
            "reference": str(self.paths.reference(self.protocol)),
            "write_reference": method.name == BASELINE,
            "models": str(self.paths.models) if self.keep_models else None,
            "scratch": str(self.out),
            "estimate": estimate,
        }
        job_path = self.out / f".job-{method.name}.json"
        write_json_atomic(job_path, job)
        self.paths.result(method.name).unlink(missing_ok=True)
        log = self.paths.logs / f"{method.name}.log"
        self._emit(Event(method.name, "start"))
        try:
            error = self._run_worker(method, job_path, log)
        finally:
            job_path.unlink(missing_ok=True)
        if error is not None:
            result = Result.of(method, self.protocol, "failed", error, **{**estimate, "available": True})
            write_result(self.paths.result(method.name), result)
        self._emit(Event(method.name, "failed" if error else "done"))

    def _run_worker(self, method: Method, job_path: Path, log: Path) -> str | None:
        """Run one worker to its end; the error that stopped it, or ``None``."""
        env = {
            **os.environ,
            "QUANTKIT_QUIET": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(self.protocol.threads),
        }
        error = None
        with open(log, "w", encoding="utf-8") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "quantkit.compare", str(job_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=env,
                text=True,
            )
            try:
                for line in worker.stdout:
                    event = _parse_event(line)
                    if event is None:
                        continue
                    if event.get("stage") == "error":
                        error = event.get("message", "unknown error")
                    else:
                        self._emit(Event(method.name, event["stage"], event.get("done", 0), event.get("total", 0)))
                code = worker.wait()
            except BaseException:
                worker.kill()
                worker.wait()
                raise
        if error is None and code != 0:
            error = f"worker exited with {_exit_reason(code)}; see {log}"
        elif error is None and not is_done(read_result(self.paths.result(method.name)), method, self.protocol):
            error = f"worker wrote no result; see {log}"
        return error

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _parse_event(line: str) -> dict | None:
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        return json.loads(line[len(EVENT_PREFIX) :])
    except json.JSONDecodeError:
        return None


def _availability(method: Method, protocol: Protocol) -> str | None:
    """Why ``method`` cannot run on the protocol's device, or ``None`` when it can."""
    try:
        backend_for(method, protocol)
    except QuantkitError as exc:
        return str(exc)
    return None


def _estimates(methods: Sequence[Method], protocol: Protocol) -> dict[str, dict[str, Any]]:
    """The size estimator's prediction for each method, as :class:`Result` fields (skipped when
    the model's config is unreadable)."""
    raw = model_config(protocol.model)
    if raw is None:
        return {}
    estimates = {}
    for m in methods:
        try:
            e = estimate(config=m.config, model_config=raw, dtype=m.dtype)  # workers load float32 models
        except Exception as exc:  # an estimate is a comparison point, never a reason to stop
            estimates[m.name] = {"estimate_error": f"{type(exc).__name__}: {exc}"}
            continue
        estimates[m.name] = {
            "estimated_bits_per_param": e.bits_per_param,
            "estimated_size_bytes": e.total_bytes,
            "code_bits": e.code_bits,
        }
    return estimates


def model_config(model: str | None) -> dict | None:
    """The ``config.json`` of a model (the embedded default, a folder or a hub id), or ``None``."""
    if model is not None and Path(model).suffix.lower() == ".gguf":
        return None
    if model is None:
        model = str(default_model_folder())
    path = Path(model) / "config.json"
    try:
        if path.is_file():
            return json.loads(path.read_text())
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).to_dict()
    except Exception:
        return None
