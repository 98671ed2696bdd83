"""The parent of a comparison: it hands each method to an executor as a :class:`Job` and files the results.

Every method runs in a fresh worker process so that its peak memory is its own and a crash
costs only that method: by default (:class:`ProcessExecutor`) one local ``python -m
quantkit.compare JOB`` at a time, or as Ray tasks (:class:`~.ray_executor.RayExecutor`). The
parent writes every result to ``OUT/results/<method>.json`` atomically, a failure as a
``failed`` row; a rerun skips methods whose result matches the current protocol and method,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
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


@dataclass(frozen=True)
class Job:
    """One method to measure: what its worker reads (``spec``, JSON) and where its log goes."""

    method: Method
    protocol: Protocol
    spec: dict[str, Any]
    log: Path

    @property
    def result(self) -> Path:
        """Where the parent files the method's result."""
        return Path(self.spec["result"])


Outcome = Result | str
"""What an executor reports for a job: the measured result, or the error that stopped it."""


class Executor(abc.ABC):
    """Runs the workers of a comparison; the :class:`Comparison` files what they report."""

    @abc.abstractmethod
    def run(self, jobs: Sequence[Job], emit: Callable[[Event], None]) -> Iterator[tuple[Job, Outcome]]:
        """Measure ``jobs``, each in a fresh worker process, and yield each with its outcome as it
        finishes; ``emit`` receives each job's ``start`` and stage events. Closing the iterator
        (an interrupt) stops the workers still running."""


class ProcessExecutor(Executor):
    """Local worker processes (``python -m quantkit.compare JOB``), one at a time, their
    stderr in the job's log and their stage events on the progress view."""

    def run(self, jobs: Sequence[Job], emit: Callable[[Event], None]) -> Iterator[tuple[Job, Outcome]]:
        for job in jobs:
            yield job, self._run_one(job, emit)

    def _run_one(self, job: Job, emit: Callable[[Event], None]) -> Outcome:
        job_path = Path(job.spec["scratch"]) / f".job-{job.method.name}.json"
        write_json_atomic(job_path, job.spec)
        job.result.unlink(missing_ok=True)  # what the worker writes is the only result read back
        emit(Event(job.method.name, "start"))
        try:
            error = self._run_worker(job, job_path, emit)
        finally:
            job_path.unlink(missing_ok=True)
        return error if error is not None else read_result(job.result)

    def _run_worker(self, job: Job, job_path: Path, emit: Callable[[Event], None]) -> str | None:
        """Run one worker to its end; the error that stopped it, or ``None``."""
        env = {
            **os.environ,
            "QUANTKIT_QUIET": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(job.protocol.threads),
        }
        error = None
        with open(job.log, "w", encoding="utf-8") as log_file:
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
                        emit(Event(job.method.name, event["stage"], event.get("done", 0), event.get("total", 0)))
                code = worker.wait()
            except BaseException:
                worker.kill()
                worker.wait()
                raise
        if error is None and code != 0:
            error = f"worker exited with {_exit_reason(code)}; see {job.log}"
        elif error is None and not is_done(read_result(job.result), job.method, job.protocol):
            error = f"worker wrote no result; see {job.log}"
        return error


@dataclass
class Comparison:
    """A comparison of ``methods`` under ``protocol`` kept in ``out``.

    :meth:`run` measures the methods not yet done, each in its own worker run by ``executor``
    (default: local processes, one at a time), and returns every method's result (measured,
    unavailable or failed). One run at a time per ``out``: a run first removes what a killed
    one left behind.
    """

    methods: list[Method]
    protocol: Protocol
    out: Path
    force: bool = False
    keep_models: bool = False
    keep_reference: bool = False
    llama_python: str | None = None
    """A Python with ``llama-cpp-python``: GGUF rows also time llama.cpp on their ``.gguf``."""
    on_event: Callable[[Event], None] | None = None
    executor: Executor = field(default_factory=ProcessExecutor)
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
        """Measure the pending methods; a crash or interrupt loses only the methods in flight."""
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
        jobs = [self._job(m, estimates.get(m.name, {})) for m in runnable]
        # The baseline runs alone first: it writes the log-probabilities the others read.
        for batch in ([j for j in jobs if j.method is baseline], [j for j in jobs if j.method is not baseline]):
            if batch:
                self._execute(batch)
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

    def _job(self, method: Method, estimate: dict[str, Any]) -> Job:
        spec = {
            "method": method.to_dict(),
            "protocol": self.protocol.to_dict(),
            "result": str(self.paths.result(method.name)),
            "reference": str(self.paths.reference(self.protocol)),
            "write_reference": method.name == BASELINE,
            "models": str(self.paths.models) if self.keep_models else None,
            "scratch": str(self.out),
            "estimate": estimate,
            "llama_python": self.llama_python,
        }
        return Job(method, self.protocol, spec, self.paths.logs / f"{method.name}.log")

    def _execute(self, jobs: Sequence[Job]) -> None:
        """Run ``jobs`` through the executor and file each outcome as it arrives: a result as
        reported, an error as a ``failed`` row."""
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        outcomes = self.executor.run(jobs, self._emit)
        try:
            for job, outcome in outcomes:
                if isinstance(outcome, str):
                    extra = {**job.spec["estimate"], "available": True}
                    outcome = Result.of(job.method, self.protocol, "failed", outcome, **extra)
                write_result(job.result, outcome)
                self._emit(Event(job.method.name, "done" if outcome.status == "ok" else "failed"))
        finally:
            outcomes.close()

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
