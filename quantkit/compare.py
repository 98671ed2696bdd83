"""Compare quantization methods on one model, one text and one protocol.

Every method runs in a fresh worker process (``python -m quantkit.compare JOB``)
so that its peak memory is its own and a crash costs only that method. The
worker loads the model, quantizes it, saves it to measure the stored bytes,
evaluates perplexity, KL divergence and top-1 agreement against the float
baseline's next-token distribution, and times prefill and decoding. Its result
is written to ``OUT/results/<method>.json`` atomically; a rerun skips methods
whose result matches the current protocol and config, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.config import QuantConfig
from .core.resolve import config_from_dict
from .core.errors import ConfigValueError, QuantkitError

BASELINE = "fp32"
FLOAT_METHODS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Unquantized methods: the model stored in a float dtype."""

RESULT_KEYS = (
    "method", "config", "available", "status", "reason", "backend", "nominal_bits", "code_bits", "requires_calibration",
    "bits_per_param", "estimated_bits_per_param", "size_bytes", "estimated_size_bytes",
    "quantized_params", "quantized_bytes", "quantize_seconds", "peak_rss_bytes", "rss_before_quantize_bytes",
    "perplexity", "delta_perplexity", "delta_perplexity_pct", "kl_divergence", "top1_agreement",
    "prefill_tokens_per_s", "decode_tokens_per_s", "eval_seconds", "worker_seconds", "quantize_cpu_seconds",
    "cpu_seconds",
)
"""The keys of every result row, in report order."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Protocol:
    """What every method is measured on: the same model, tokens, windows, device and threads."""

    model: str | None = None
    """Hub id, folder or ``.gguf`` file; ``None``: the embedded SmolLM2-135M."""
    dataset: str = "pydoc"
    """Dataset name or text file: calibration and evaluation use its disjoint splits."""
    eval_tokens: int = 4096
    seqlen: int = 512
    stride: int = 512
    calibration_samples: int = 16
    calibration_seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    decode_tokens: int = 8
    prompt_tokens: int = 128

    def __post_init__(self) -> None:
        positive = ("eval_tokens", "seqlen", "stride", "calibration_samples", "calibration_seqlen",
                    "threads", "decode_tokens", "prompt_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigValueError("Protocol", name, value, "a positive int")
        if self.seqlen < 2 or self.stride > self.seqlen:
            raise ConfigValueError("Protocol", "stride", self.stride, f"1..seqlen ({self.seqlen}), seqlen >= 2")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short hash: results measured under another protocol are never mixed in."""
        return _digest(self.to_dict())

    def describe(self) -> str:
        model = self.model or "embedded SmolLM2-135M-Instruct"
        return (
            f"model {model}; text {self.dataset!r} (calibration and evaluation splits are disjoint); "
            f"evaluation: first {self.eval_tokens} tokens, windows of {self.seqlen} every {self.stride}; "
            f"calibration: {self.calibration_samples} x {self.calibration_seqlen} tokens (seed {self.seed}); "
            f"device {self.device}, {self.threads} threads; decode: {self.decode_tokens} greedy tokens "
            f"after a {self.prompt_tokens}-token prompt"
        )


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a quantization config, or the model in a float dtype."""

    name: str
    config: QuantConfig | None = None
    dtype: str = "float32"
    """Storage dtype of an unquantized method (``config is None``)."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigValueError("Method", "name", self.name, "letters, digits, '.', '_' and '-'")
        if self.config is None and self.dtype not in FLOAT_METHODS.values():
            raise ConfigValueError("Method", "dtype", self.dtype, ", ".join(FLOAT_METHODS.values()))

    @property
    def is_float(self) -> bool:
        return self.config is None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": None if self.config is None else self.config.to_dict(),
                "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Method:
        config = data.get("config")
        return cls(data["name"], None if config is None else config_from_dict(config), data.get("dtype", "float32"))

    def key(self) -> str:
        return _digest(self.to_dict())

    @property
    def nominal_bits(self) -> float | None:
        """The bit width the method is named for (4 for NF4 and Q4_K_M, 16 for bf16)."""
        if self.config is None:
            return {"float32": 32.0, "bfloat16": 16.0, "float16": 16.0}[self.dtype]
        return self.config.code_bits


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# -- method lists --------------------------------------------------------------------


def method_from_name(name: str, protocol: Protocol, overrides: Mapping[str, Any] | None = None,
                     label: str | None = None) -> Method:
    """``fp32``/``bf16``/``fp16``, a preset or a ``quant_method``, with the protocol's calibration."""
    from .core.resolve import preset

    if name in FLOAT_METHODS:
        return Method(label or name, None, FLOAT_METHODS[name])
    config = with_protocol(preset(name, overrides), protocol, explicit=set(overrides or ()))
    return Method(label or name, config)


def with_protocol(config: QuantConfig, protocol: Protocol, explicit: Iterable[str] = ()) -> QuantConfig:
    """``config`` with the protocol's calibration samples, length and text, unless set explicitly."""
    explicit = set(explicit)
    fields = {f.name for f in dataclasses.fields(config)}
    wanted = {"nsamples": protocol.calibration_samples, "seqlen": protocol.calibration_seqlen,
              "dataset": protocol.dataset}
    changes = {k: v for k, v in wanted.items() if k in fields and k not in explicit}
    return dataclasses.replace(config, **changes) if changes else config


def methods_from_file(path: Path, protocol: Protocol) -> list[Method]:
    """Methods from a YAML/JSON file: a list (or ``{"methods": [...]}``) whose entries are
    preset names or dicts with a ``name`` and either ``preset`` (plus field overrides)
    or a full config (``quant_method`` and fields)."""
    from .core.config_files import read_config_file

    data = read_config_file(path)
    entries = data.get("methods") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise ConfigValueError(str(path), "methods", type(entries).__name__, "a list of method entries")
    methods = []
    for entry in entries:
        if isinstance(entry, str):
            methods.append(method_from_name(entry, protocol))
            continue
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ConfigValueError(str(path), "entry", entry, "a preset name or a dict with a 'name'")
        fields = {k: v for k, v in entry.items() if k not in ("name", "preset")}
        if "quant_method" in entry:
            config = with_protocol(config_from_dict(fields), protocol, explicit=fields)
            methods.append(Method(entry["name"], config))
        else:
            methods.append(method_from_name(entry.get("preset", entry["name"]), protocol, fields, entry["name"]))
    return methods


def resolve_methods(names: Sequence[str] | None, protocol: Protocol, config_file: Path | None = None) -> list[Method]:
    """The methods to compare, the float baseline first (added when missing).

    ``names`` may include ``default`` (:data:`DEFAULT_METHODS`) and ``all``
    (every float dtype and preset).
    """
    from .core.registry import get_registry
    from .core.resolve import default_comparison

    methods = methods_from_file(config_file, protocol) if config_file else []
    groups = {"default": ("fp32", *default_comparison()), "all": (*FLOAT_METHODS, *get_registry().presets)}
    if names or not config_file:
        expanded = [n for name in (names or ["default"]) for n in groups.get(name, (name,))]
        methods += [method_from_name(n, protocol) for n in dict.fromkeys(expanded)]
    seen: set[str] = set()
    for m in methods:
        if m.name in seen:
            raise ConfigValueError("compare", "methods", m.name, "unique method names")
        seen.add(m.name)
    baseline = [m for m in methods if m.name == BASELINE] or [method_from_name(BASELINE, protocol)]
    return baseline + [m for m in methods if m.name != BASELINE]


# -- the out directory ------------------------------------------------------------------


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


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_done(result: dict | None, method: Method, protocol: Protocol) -> bool:
    """A finished measurement of ``method`` under ``protocol``."""
    return bool(
        result and result.get("status") == "ok" and result.get("protocol_key") == protocol.key()
        and result.get("method_key") == method.key()
    )


# -- the parent: scheduling workers ----------------------------------------------------------


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
            raise ConfigValueError("Comparison", "methods", [m.name for m in self.methods],
                                   f"a list starting with the float baseline {BASELINE!r}")

    def pending(self) -> list[Method]:
        """Methods without a finished result for this protocol (all with ``force``)."""
        if self.force:
            return list(self.methods)
        return [m for m in self.methods if not is_done(read_result(self.paths.result(m.name)), m, self.protocol)]

    def run(self) -> list[dict]:
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
            result = {**_result_stub(method, self.protocol, "unavailable", reason), **estimates.get(method.name, {})}
            write_json_atomic(self.paths.result(method.name), result)
            self._emit(Event(method.name, "unavailable"))
        reference = self.paths.reference(self.protocol)
        baseline = self.methods[0]
        if any(m is not baseline for m in runnable) and not reference.is_file() and baseline not in runnable:
            runnable.insert(0, baseline)  # the baseline's log-probabilities are needed again
        for method in runnable:
            self._measure(method, estimates.get(method.name, {}))
        if not self.keep_reference and all(r["status"] in ("ok", "unavailable") for r in self.results()):
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

    def results(self) -> list[dict]:
        """Every method's latest result under this protocol (a placeholder if none)."""
        rows = []
        for m in self.methods:
            r = read_result(self.paths.result(m.name))
            if not r or r.get("protocol_key") != self.protocol.key() or r.get("method_key") != m.key():
                r = _result_stub(m, self.protocol, "pending", "not measured yet")
            rows.append(r)
        return rows

    def _measure(self, method: Method, estimate: dict) -> None:
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
            result = _result_stub(method, self.protocol, "failed", error)
            result.update(available=True, **estimate)
            write_json_atomic(self.paths.result(method.name), result)
        self._emit(Event(method.name, "failed" if error else "done"))

    def _run_worker(self, method: Method, job_path: Path, log: Path) -> str | None:
        """Run one worker to its end; the error that stopped it, or ``None``."""
        env = {**os.environ, "QUANTKIT_QUIET": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(self.protocol.threads)}
        error = None
        with open(log, "w", encoding="utf-8") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "quantkit.compare", str(job_path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env, text=True,
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
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


_EVENT_PREFIX = "@quantkit-event "


def _parse_event(line: str) -> dict | None:
    if not line.startswith(_EVENT_PREFIX):
        return None
    try:
        return json.loads(line[len(_EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None


def _result_stub(method: Method, protocol: Protocol, status: str, reason: str) -> dict:
    result: dict[str, Any] = {key: None for key in RESULT_KEYS}
    result.update(
        method=method.name, config=method.to_dict()["config"], dtype=method.dtype, status=status,
        available=status not in ("unavailable",), reason=reason, nominal_bits=method.nominal_bits,
        protocol=protocol.to_dict(), protocol_key=protocol.key(), method_key=method.key(),
    )
    return result


def _availability(method: Method, protocol: Protocol) -> str | None:
    """Why ``method`` cannot run on the protocol's device, or ``None`` when it can."""
    if method.is_float:
        return None
    from .core.hardware import hardware_of
    from .core.registry import get_registry

    try:
        get_registry().backend_for(method.config, hardware_of(protocol.device))
    except QuantkitError as exc:
        return str(exc)
    return None


def _estimates(methods: Sequence[Method], protocol: Protocol) -> dict[str, dict]:
    """The size estimator's prediction for each method (skipped when the model's config is unreadable)."""
    from .estimate import estimate

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
        estimates[m.name] = {"estimated_bits_per_param": e.bits_per_param, "estimated_size_bytes": e.total_bytes,
                             "code_bits": e.code_bits}
    return estimates


def model_config(model: str | None) -> dict | None:
    """The ``config.json`` of a model (the embedded default, a folder or a hub id), or ``None``."""
    if model is not None and Path(model).suffix.lower() == ".gguf":
        return None
    if model is None:
        from .models import default_model_folder

        model = str(default_model_folder())
    path = Path(model) / "config.json"
    try:
        if path.is_file():
            return json.loads(path.read_text())
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).to_dict()
    except Exception:
        return None


# -- the worker: one method, one process --------------------------------------------------


class _Reporter:
    """Writes events to the parent on a private copy of stdout (the real one goes to the log)."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)  # library prints end up in the log, never in the event stream
        sys.stdout = sys.stderr

    def __call__(self, stage: str, done: int = 0, total: int = 0, **extra: Any) -> None:
        self._out.write(_EVENT_PREFIX + json.dumps({"stage": stage, "done": done, "total": total, **extra}) + "\n")


def _exit_with_parent() -> None:
    """End this worker when the parent goes away (its end of our stdin closes)."""

    def watch() -> None:
        try:
            while sys.stdin.read(1):
                pass
        except (OSError, ValueError):
            pass
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def measure(job: dict, report: Callable[..., None]) -> dict:
    """Quantize, save, evaluate and time one method as ``job`` describes; return its result."""
    import psutil
    import torch

    from .calibration import evaluation_tokens
    from .evaluate import decode_speed, evaluate
    from .models import load_model

    started = time.perf_counter()
    method, protocol = Method.from_dict(job["method"]), Protocol(**job["protocol"])
    torch.set_num_threads(protocol.threads)
    torch.manual_seed(protocol.seed)
    device = torch.device(protocol.device)
    report("load")
    model, tokenizer = load_model(protocol.model)
    eval_ids = evaluation_tokens(tokenizer, protocol.dataset, max_tokens=protocol.eval_tokens)
    quantized_names, quantized_params = quantized_linears(model, method)
    rss_before = psutil.Process().memory_info().rss
    report("quantize")
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    model, backend = apply_method(model, tokenizer, method, protocol)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    quantize_seconds, quantize_cpu = time.perf_counter() - start, _cpu_seconds() - start_cpu
    peak_rss = _peak_rss_bytes()
    report("save")
    stored = save_and_measure(model, method, quantized_names, scratch=Path(job["scratch"]),
                              keep_in=Path(job["models"]) if job["models"] else None)
    report("evaluate", 0, 1)
    reference = Path(job["reference"])
    result = evaluate(
        model, eval_ids, seqlen=protocol.seqlen, stride=protocol.stride,
        reference=reference if not job["write_reference"] and reference.is_file() else None,
        write_reference=reference if job["write_reference"] else None,
        progress=lambda done, total: report("evaluate", done, total),
    )
    report("decode")
    decode = decode_speed(model, eval_ids[:, : protocol.prompt_tokens], protocol.decode_tokens)
    return {
        **_result_stub(method, protocol, "ok", ""),
        **job.get("estimate", {}),
        "backend": backend.name if backend else None,
        "requires_calibration": bool(backend and backend.capabilities.requires_calibration),
        "bits_per_param": 8 * stored["quantized_bytes"] / quantized_params,
        "size_bytes": stored["size_bytes"],
        "quantized_params": quantized_params,
        "quantized_bytes": stored["quantized_bytes"],
        "quantize_seconds": quantize_seconds,
        "quantize_cpu_seconds": quantize_cpu,
        "peak_rss_bytes": peak_rss,
        "rss_before_quantize_bytes": rss_before,
        "perplexity": result.perplexity,
        "mean_nll": result.mean_nll,
        "scored_tokens": result.scored_tokens,
        "kl_divergence": result.kl_divergence,
        "top1_agreement": result.top1_agreement,
        "prefill_tokens_per_s": result.prefill_tokens_per_s,
        "decode_tokens_per_s": decode,
        "eval_seconds": result.seconds,
        "worker_seconds": time.perf_counter() - started,
        "cpu_seconds": _cpu_seconds(),
        "environment": environment(),
    }


def quantized_linears(model, method: Method) -> tuple[list[str], int]:
    """Names and weight count of the linears ``method`` quantizes (for a float method: the
    ones a default config would), measured before quantizing."""
    from .core.linears import quantizable_linears

    targets = quantizable_linears(model, method.config or QuantConfig())
    return [name for name, _, _ in targets], sum(linear.weight.numel() for _, linear, _ in targets)


def apply_method(model, tokenizer, method: Method, protocol: Protocol):
    """Quantize ``model`` with ``method`` on the protocol's device, calibrating on the protocol's
    calibration split when the backend needs it; a float method casts. Returns the model and
    the backend used (``None`` for a float method)."""
    import torch

    import quantkit

    from .calibration import calibration_tokens
    from .core.hardware import hardware_of
    from .core.registry import get_registry

    device = torch.device(protocol.device)
    if method.is_float:
        return model.to(device=device, dtype=getattr(torch, method.dtype)), None
    backend = get_registry().backend_for(method.config, hardware_of(device))
    calibration = None
    if backend.capabilities.requires_calibration:
        calibration = calibration_tokens(
            tokenizer, protocol.dataset, nsamples=getattr(method.config, "nsamples", protocol.calibration_samples),
            seqlen=getattr(method.config, "seqlen", protocol.calibration_seqlen), seed=protocol.seed,
        )
    return quantkit.quantize(model, method.config, calibration=calibration, device=device), backend


def _cpu_seconds() -> float:
    """CPU time of this worker: on a shared machine, a steadier measure of work than wall time."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def save_and_measure(model, method: Method, quantized_names: Iterable[str], *, keep_in: Path | None = None,
                     scratch: Path | None = None) -> dict:
    """Save ``model`` as its backend does (a float method: one safetensors file) and count the
    bytes on disk (see :func:`stored_bytes`). The saved folder is kept under ``keep_in``,
    else written to a temporary folder (in ``scratch``) and removed."""
    import quantkit

    from .core.serialization import unique_state_dict

    if keep_in is not None:
        folder = Path(keep_in) / method.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = None
    else:
        temporary = Path(tempfile.mkdtemp(prefix=f".save-{method.name}-", dir=scratch))
        folder = temporary / "model"
    try:
        if method.is_float:
            from safetensors.torch import save_file

            folder.mkdir(parents=True)
            model.config.to_json_file(folder / "config.json")
            save_file(unique_state_dict(model), folder / "model.safetensors", metadata={"format": "pt"})
        else:
            quantkit.save(model, folder)
        return stored_bytes(folder, quantized_names)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def stored_bytes(folder: Path, module_names: Iterable[str]) -> dict:
    """Bytes of a saved model folder: ``size_bytes`` (every file) and ``quantized_bytes``
    (the safetensors tensors named ``<module>.*`` for the given modules)."""
    prefixes = tuple(f"{name}." for name in module_names)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    quantized = 0
    for path in folder.rglob("*.safetensors"):
        for name, info in safetensors_header(path).items():
            if name != "__metadata__" and name.startswith(prefixes):
                begin, end = info["data_offsets"]
                quantized += end - begin
    return {"size_bytes": size, "quantized_bytes": quantized}


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, byte offsets)."""
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(length))


def environment() -> dict[str, Any]:
    """What a measurement ran on: versions, CPU, threads and the machine's load."""
    import platform

    import torch
    import transformers

    from .core.plugin_host import distribution_version

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "quantkit": distribution_version("quantkit") or "?",
            "platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": load}


def run_header() -> str:
    """Two lines a benchmark prints first: the command line it ran with and :func:`environment`."""
    import shlex

    return f"command: {shlex.join([sys.executable, *sys.argv])}\nenvironment: {json.dumps(environment())}"


def worker_main(job_path: str) -> int:
    """Entry point of a worker process: measure one job, write its result atomically."""
    report = _Reporter()
    _exit_with_parent()
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    try:
        result = measure(job, report)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        report("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    write_json_atomic(Path(job["result"]), result)
    report("written")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
