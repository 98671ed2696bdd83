"""Comparison workers as Ray tasks: the same command on a laptop (a local Ray instance) or a cluster.

Each job is one task in a fresh Ray worker process (``max_calls=1``, so its peak memory is its
own) that declares what it needs: the protocol's threads as CPUs, a GPU when the protocol's
device is CUDA, and the memory the estimator predicts for quantizing and evaluating the method.
The task returns its result to the driver, which files it as the local executor's results are
filed; a task that raises or whose worker dies is one ``failed`` row, never retried by Ray (a
rerun resumes it). Every node must see the comparison's folder at the same path (a shared
filesystem): the workers write their logs there and the float baseline's log-probabilities,
which the other methods read.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.errors import BackendUnavailableError, ConfigValueError
from ..estimate import PROCESS_BYTES, REFERENCE_RATES, estimate, estimate_quantization
from .methods import Method
from .protocol import Protocol
from .results import Result
from .runner import Event, Executor, Job, Outcome, model_config
from .worker import measure as measure_method

LOCAL = "local"
"""The address that starts a local Ray instance (``quantkit compare --ray`` with no address)."""

EVALUATION_COPIES = 4
"""float32 ``(seqlen, vocab)`` tensors alive at once while a window is scored (logits, log-probs,
the baseline's rows and their difference)."""

Measure = Callable[[dict[str, Any], Callable[..., None]], Result]


def import_ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError(
            f"running the comparison on Ray needs the package 'ray' ({exc}): pip install 'quantkit[ray]'"
        ) from exc
    return ray


def task_resources(method: Method, protocol: Protocol, model: dict[str, Any] | None) -> dict[str, Any]:
    """The Ray resources of ``method``'s task: ``num_cpus`` (the protocol's threads), ``num_gpus``
    (1 on CUDA) and ``memory`` in bytes where it can be predicted (see :func:`predicted_memory`;
    the task's log states what it was given)."""
    resources: dict[str, Any] = {
        "num_cpus": protocol.threads,
        "num_gpus": 1 if torch.device(protocol.device).type == "cuda" else 0,
    }
    memory = predicted_memory(method, protocol, model)
    if memory is not None:
        resources["memory"] = memory
    return resources


def predicted_memory(method: Method, protocol: Protocol, model: dict[str, Any] | None) -> int | None:
    """The host memory ``method``'s worker needs: the estimator's peak for quantizing (at least the
    process and the float32 model) plus the evaluation's working set; ``None`` when the model's
    config is unreadable or the estimator cannot size it."""
    if model is None:
        return None
    try:
        peak = PROCESS_BYTES + estimate(config=None, model_config=model, dtype="float32").total_bytes
        if method.config is not None:
            peak = max(peak, estimate_quantization(model, method.config, rates=REFERENCE_RATES).peak_bytes)
    except Exception:  # a prediction sizes the task, never a reason to stop the comparison
        return None
    return int(peak + EVALUATION_COPIES * protocol.seqlen * int(model.get("vocab_size", 0)) * 4)


class RayExecutor(Executor):
    """Runs every job as a Ray task, as many at a time as the cluster's resources allow.

    ``address`` is passed to ``ray.init`` when Ray is not initialized yet in this process
    (:data:`LOCAL` starts a local instance; ``auto`` or ``ray://HOST:PORT`` joins a cluster);
    an initialized Ray is used as it is. Several comparisons may share one executor, each
    running from its own thread. ``measure`` is what each task runs on its job (the
    worker's measurement).
    """

    def __init__(self, address: str = LOCAL, measure: Measure = measure_method) -> None:
        self.ray = import_ray()
        if not self.ray.is_initialized():
            self.ray.init(address=address, log_to_driver=False)
        self.measure = measure

    def run(self, jobs: Sequence[Job], emit: Callable[[Event], None]) -> Iterator[tuple[Job, Outcome]]:
        ray = self.ray
        task = ray.remote(max_calls=1, max_retries=0)(run_task)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        models: dict[str | None, dict[str, Any] | None] = {}
        running: dict[Any, Job] = {}
        unfit: list[tuple[Job, str]] = []
        try:
            for job in jobs:
                _check_device(job.protocol)
                if job.protocol.model not in models:
                    models[job.protocol.model] = model_config(job.protocol.model)
                resources = task_resources(job.method, job.protocol, models[job.protocol.model])
                emit(Event(job.method.name, "start"))
                reason = _unfit(resources, nodes)
                if reason is not None:
                    unfit.append((job, reason))
                    continue
                options = {**resources, "name": f"quantkit-compare:{job.method.name}"}
                running[task.options(**options).remote(job.spec, str(job.log), resources, self.measure)] = job
            yield from unfit
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                job = running.pop(done[0])
                yield job, _outcome(ray, done[0])
        finally:
            for ref in running:
                ray.cancel(ref, force=True)


def run_task(spec: dict[str, Any], log: str, resources: dict[str, Any], measure: Measure) -> dict[str, Any]:
    """The body of a Ray task (in a fresh worker): measure one job with its output in ``log``;
    returns ``{"result": ...}`` or ``{"error": ...}``."""
    if not Path(spec["scratch"]).is_dir():
        return {
            "error": f"the comparison folder {spec['scratch']!r} is not visible on Ray node {socket.gethostname()}: "
            "every node must see it at the same path (a shared filesystem)"
        }
    os.environ["QUANTKIT_QUIET"] = "1"
    with open(log, "w", encoding="utf-8", buffering=1) as out, _output_to(out):
        print(f"Ray task on {socket.gethostname()} (pid {os.getpid()}) with {resources}", file=sys.stderr)
        try:
            result = measure(spec, _StageLog())
        except Exception as exc:
            traceback.print_exc()
            return {"error": f"{type(exc).__name__}: {exc}"}
    return {"result": result.to_dict()}


class _StageLog:
    """The task's progress report: each new stage is a line of its log."""

    def __init__(self) -> None:
        self.stage = ""

    def __call__(self, stage: str, done: int = 0, total: int = 0, **extra: Any) -> None:
        if stage != self.stage:
            self.stage = stage
            print(f"stage: {stage}", file=sys.stderr)


@contextlib.contextmanager
def _output_to(log) -> Iterator[None]:
    """Send this process's stdout and stderr (Python's and the C libraries') to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        log.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _outcome(ray: Any, ref: Any) -> Outcome:
    """The result a finished task returned, or why it has none (its exception, its worker's death)."""
    try:
        reply = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        return f"{type(cause).__name__}: {cause}"
    except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory) or the task was cancelled
        return f"the Ray worker running it failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    if "error" in reply:
        return reply["error"]
    return Result.from_dict(reply["result"])


def _check_device(protocol: Protocol) -> None:
    device = torch.device(protocol.device)
    if device.type == "cuda" and device.index not in (None, 0):
        raise ConfigValueError(
            "compare --ray", "device", protocol.device, "'cuda' (Ray gives each task one GPU of its node)"
        )


def _unfit(resources: dict[str, Any], nodes: Sequence[dict[str, float]]) -> str | None:
    """Why no node of the cluster can run a task needing ``resources`` (Ray would wait forever), or ``None``."""
    needed = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"], "memory": resources.get("memory", 0)}
    if any(all(node.get(k, 0) >= v for k, v in needed.items() if v) for node in nodes):
        return None
    most = {k: max((node.get(k, 0) for node in nodes), default=0) for k in needed}
    return f"no Ray node has what this method needs: {_describe(needed)}; the nodes have at most {_describe(most)}"


def _describe(resources: dict[str, float]) -> str:
    return f"{resources['CPU']:g} CPUs, {resources['GPU']:g} GPUs, {resources['memory'] / 2**30:.1f} GiB memory"
