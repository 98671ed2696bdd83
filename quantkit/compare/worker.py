"""The worker: one method measured in its own process (``python -m quantkit.compare JOB``).

It loads the model, quantizes it, saves it to measure the stored bytes, evaluates perplexity,
KL divergence and top-1 agreement against the float baseline's next-token distribution
(several times when the method is not deterministic), times prefill and decoding, and
writes its :class:`Result` atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from ..api import quantize, save
from ..calibration import calibration_tokens, evaluation_tokens
from ..core.backend import Backend
from ..core.config import QuantConfig
from ..core.dispatch import chosen_kernels, set_kernel
from ..core.linears import quantizable_linears
from ..core.safetensors_files import stored_bytes
from ..core.serialization import unique_state_dict
from ..evaluate import EvalResult, decode_speed, evaluate
from ..models import load_model
from .environment import environment
from .llama_cpp import llama_cpp_speed
from .methods import Method, backend_for
from .protocol import Protocol
from .results import Result, write_result

EVENT_PREFIX = "@quantkit-event "
"""Marks the lines of a worker's stdout that are events for the parent."""


class _Reporter:
    """Writes events to the parent on a private copy of stdout (the real one goes to the log)."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)  # library prints end up in the log, never in the event stream
        sys.stdout = sys.stderr

    def __call__(self, stage: str, done: int = 0, total: int = 0, **extra: Any) -> None:
        self._out.write(EVENT_PREFIX + json.dumps({"stage": stage, "done": done, "total": total, **extra}) + "\n")


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


def measure(job: dict[str, Any], report: Callable[..., None]) -> Result:
    """Quantize, save, evaluate and time one method as ``job`` describes; return its result."""
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
    stored = save_and_measure(
        model,
        method,
        quantized_names,
        scratch=Path(job["scratch"]),
        keep_in=Path(job["models"]) if job["models"] else None,
    )
    reference = Path(job["reference"])
    runs = evaluate_repeatedly(
        model,
        eval_ids,
        protocol,
        method.evaluations or 1,
        reference=reference if not job["write_reference"] and reference.is_file() else None,
        write_reference=reference if job["write_reference"] else None,
        report=report,
    )
    result = median_run(runs)
    report("decode")
    decode = decode_speed(model, eval_ids[:, : protocol.prompt_tokens], protocol.decode_tokens)
    llama = llama_cpp_speeds(model, tokenizer, backend, job, eval_ids[0, : protocol.prompt_tokens].tolist(), protocol)
    spread: dict[str, float] = {}
    if method.evaluations is not None:
        spread = {"perplexity_min": min(r.perplexity for r in runs), "perplexity_max": max(r.perplexity for r in runs)}
    return Result.of(
        method,
        protocol,
        "ok",
        **job.get("estimate", {}),
        **spread,
        backend=backend.name if backend else None,
        requires_calibration=bool(backend and backend.capabilities.requires_calibration),
        bits_per_param=8 * stored["quantized_bytes"] / quantized_params,
        size_bytes=stored["size_bytes"],
        quantized_params=quantized_params,
        quantized_bytes=stored["quantized_bytes"],
        quantize_seconds=quantize_seconds,
        quantize_cpu_seconds=quantize_cpu,
        peak_rss_bytes=peak_rss,
        rss_before_quantize_bytes=rss_before,
        perplexity=result.perplexity,
        mean_nll=result.mean_nll,
        scored_tokens=result.scored_tokens,
        kl_divergence=result.kl_divergence,
        top1_agreement=result.top1_agreement,
        prefill_tokens_per_s=result.prefill_tokens_per_s,
        decode_tokens_per_s=decode,
        **llama,
        kernels=kernel_summary(model, backend),
        eval_seconds=result.seconds,
        worker_seconds=time.perf_counter() - started,
        cpu_seconds=_cpu_seconds(),
        environment=environment(),
    )


def kernel_summary(model: nn.Module, backend: Backend | None) -> str | None:
    """The kernels the last forward of ``model``'s quantized linears ran, with their counts
    (``int4-cpu x181, dequantize x30``); a quantized model without kernel-dispatched layers (they
    have their own forward) is named by its backend; ``None`` for a float model."""
    counts = Counter(name for name in chosen_kernels(model).values() if name is not None)
    if counts:
        return ", ".join(f"{name} x{count}" for name, count in counts.most_common())
    return None if backend is None else f"{backend.name}'s own layers"


def llama_cpp_speeds(
    model: nn.Module,
    tokenizer: Any,
    backend: Backend | None,
    job: dict[str, Any],
    prompt: list[int],
    protocol: Protocol,
) -> dict[str, float]:
    """llama.cpp's prefill and decode tokens/s on ``model`` written as a ``.gguf`` (in the
    scratch folder, then removed): for a backend that writes ``.gguf`` files when the job names a
    ``llama_python``; otherwise nothing."""
    python = job.get("llama_python")
    if not python or backend is None or ".gguf" not in backend.file_suffixes:
        return {}
    folder = Path(tempfile.mkdtemp(prefix=".save-llama-cpp-", dir=job["scratch"]))
    try:
        path = save(model, folder / "model.gguf", tokenizer=tokenizer)
        prefill, decode = llama_cpp_speed(python, path, prompt, protocol.decode_tokens, protocol.threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"llama_cpp_prefill_tokens_per_s": prefill, "llama_cpp_decode_tokens_per_s": decode}


def evaluate_repeatedly(
    model: nn.Module,
    tokens: torch.Tensor,
    protocol: Protocol,
    times: int,
    *,
    reference: Path | None,
    write_reference: Path | None,
    report: Callable[..., None],
) -> list[EvalResult]:
    """Evaluate ``model`` ``times`` times on the protocol's windows, without quantizing it again
    (only the first pass writes ``write_reference``); progress counts the windows of every pass."""
    runs: list[EvalResult] = []
    report("evaluate", 0, times)
    for i in range(times):
        runs.append(
            evaluate(
                model,
                tokens,
                seqlen=protocol.seqlen,
                stride=protocol.stride,
                reference=reference,
                write_reference=write_reference if i == 0 else None,
                progress=lambda done, total, i=i: report("evaluate", i * total + done, times * total),
            )
        )
    return runs


def median_run(runs: Sequence[EvalResult]) -> EvalResult:
    """The evaluation with the median perplexity: a measured one, which is every evaluation when they agree."""
    return sorted(runs, key=lambda r: r.perplexity)[(len(runs) - 1) // 2]


def quantized_linears(model: nn.Module, method: Method) -> tuple[list[str], int]:
    """Names and weight count of the linears ``method`` quantizes (for a float method: the
    ones a default config would), measured before quantizing."""
    targets = quantizable_linears(model, method.config or QuantConfig())
    return [name for name, _, _ in targets], sum(linear.weight.numel() for _, linear, _ in targets)


def apply_method(model: nn.Module, tokenizer, method: Method, protocol: Protocol) -> tuple[nn.Module, Backend | None]:
    """Quantize ``model`` with ``method`` on the protocol's device, calibrating on the protocol's
    calibration split when the backend needs it; a float method casts. Returns the model and
    the backend used (``None`` for a float method)."""
    device = torch.device(protocol.device)
    backend = backend_for(method, protocol)
    if backend is None:
        return model.to(device=device, dtype=getattr(torch, method.dtype)), None
    calibration = None
    if backend.needs_calibration(method.config):
        calibration = calibration_tokens(
            tokenizer,
            protocol.dataset,
            nsamples=getattr(method.config, "nsamples", protocol.calibration_samples),
            seqlen=getattr(method.config, "seqlen", protocol.calibration_seqlen),
            seed=protocol.seed,
        )
    model = quantize(model, method.config, calibration=calibration, device=device)
    return (model if protocol.kernel is None else set_kernel(model, protocol.kernel)), backend


def _cpu_seconds() -> float:
    """CPU time of this worker: on a shared machine, a steadier measure of work than wall time."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    try:
        import resource
    except ImportError:  # Windows
        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def save_and_measure(
    model: nn.Module,
    method: Method,
    quantized_names: Iterable[str],
    *,
    keep_in: Path | None = None,
    scratch: Path | None = None,
) -> dict[str, int]:
    """Save ``model`` as its backend does (a float method: one safetensors file) and count the
    bytes on disk (see :func:`stored_bytes`). The saved folder is kept under ``keep_in``,
    else written to a temporary folder (in ``scratch``) and removed."""
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
            save(model, folder)
        return stored_bytes(folder, quantized_names)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def main(job_path: str) -> int:
    """Entry point of a worker process: measure one job, write its result atomically."""
    report = _Reporter()
    _exit_with_parent()
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    try:
        result = measure(job, report)
    except Exception as exc:
        traceback.print_exc()
        report("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    write_result(Path(job["result"]), result)
    report("written")
    return 0
