"""quantkit compare --ray: every method a Ray task with declared resources, results filed by the
driver as the local worker processes' are, a killed worker one failed row that a rerun resumes."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import pytest
from test_compare import tiny_model_dir  # noqa: F401 (a fixture)

from quantkit.cli.main import main
from quantkit.compare import Comparison, Protocol, Result, complete, read_result, resolve_methods, worker
from quantkit.compare.ray_executor import RayExecutor, task_resources
from quantkit.compare.runner import model_config
from quantkit.core.errors import BackendUnavailableError
from quantkit.estimate import estimate_quantization

PROTOCOL = Protocol(
    eval_tokens=256, seqlen=64, stride=64, calibration_samples=4, calibration_seqlen=32, threads=1, decode_tokens=4
)
MEASUREMENTS = {
    "quantize_seconds",
    "quantize_cpu_seconds",
    "peak_rss_bytes",
    "rss_before_quantize_bytes",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "eval_seconds",
    "worker_seconds",
    "cpu_seconds",
    "environment",
}
"""What differs between two runs of the same method: times, speeds, memory and the machine's state."""


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (starting one takes seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def protocol(tiny_model_dir):  # noqa: F811
    return dataclasses.replace(PROTOCOL, model=str(tiny_model_dir))


def comparable(results: list[Result]) -> list[dict]:
    return [{k: v for k, v in r.to_dict().items() if k not in MEASUREMENTS} for r in results]


@pytest.mark.slow
def test_ray_fails_a_killed_worker_s_row_only_resumes_it_and_matches_the_local_workers(
    ray_instance, protocol, tmp_path
):
    """A Ray run of three methods, one of whose workers is killed mid-task, then a rerun that
    measures that one alone: the results JSON is the local worker processes' (measurements aside)."""
    methods = resolve_methods(["bf16", "rtn-4bit-g64"], protocol)
    local = Comparison(methods, protocol, tmp_path / "local").run()

    def measure_or_die(job, report):
        def report_or_die(stage, *args, **kwargs):
            if stage == "evaluate" and job["method"]["name"] == "bf16":
                os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-task: no cleanup at all
            report(stage, *args, **kwargs)

        return worker.measure(job, report_or_die)

    out, events = tmp_path / "ray", []
    executor = RayExecutor(measure=measure_or_die)
    first = Comparison(methods, protocol, out, executor=executor, on_event=events.append).run()
    assert [r.status for r in first] == ["ok", "failed", "ok"]
    assert "WorkerCrashedError" in first[1].reason and first[1].available
    assert first[2].kl_divergence > 0 and first[2].bits_per_param < 5  # measured against the baseline
    assert complete([read_result(out / "results" / f"{m.name}.json") for m in methods]) == first  # filed by the driver
    assert all("Ray task on" in (out / "logs" / f"{m.name}.log").read_text() for m in methods)
    assert [(e.method, e.stage) for e in events if e.stage in ("start", "done")][:2] == [
        ("fp32", "start"),
        ("fp32", "done"),
    ]  # the baseline first, alone: the others read its log-probabilities
    assert list(out.glob("reference-*.npy"))  # kept for the rerun

    events.clear()
    rerun = Comparison(methods, protocol, out, executor=RayExecutor(), on_event=events.append).run()
    assert [(e.method, e.stage) for e in events if e.stage != "start"] == [
        ("fp32", "skipped"),
        ("rtn-4bit-g64", "skipped"),
        ("bf16", "done"),
    ]
    assert [r.status for r in rerun] == ["ok"] * 3
    assert comparable(rerun) == comparable(local)
    assert not list(out.glob("reference-*.npy"))  # the complete run removed the baseline's log-probs


def test_a_task_no_node_can_hold_is_a_failed_row_not_a_wait(ray_instance, tmp_path):
    protocol = dataclasses.replace(PROTOCOL, threads=3)  # the instance has 2 CPUs
    results = Comparison(resolve_methods(["bf16"], protocol), protocol, tmp_path, executor=RayExecutor()).run()
    assert [r.status for r in results] == ["failed", "failed"]
    assert "no Ray node has what this method needs: 3 CPUs" in results[0].reason


def test_tasks_declare_threads_gpus_and_the_estimators_memory():
    model = model_config(None)
    protocol = dataclasses.replace(PROTOCOL, threads=3)
    gptq = resolve_methods(["gptq-4bit-g128"], protocol)[1]
    resources = task_resources(gptq, protocol, model)
    assert resources["num_cpus"] == 3 and resources["num_gpus"] == 0
    assert resources["memory"] > estimate_quantization(model, gptq.config).peak_bytes
    fp32 = task_resources(resolve_methods(["fp32"], protocol)[0], dataclasses.replace(protocol, device="cuda"), model)
    assert fp32["num_gpus"] == 1 and 134e6 * 4 < fp32["memory"] < resources["memory"]
    assert "memory" not in task_resources(gptq, protocol, None)  # a model without a readable config
    assert "memory" not in task_resources(gptq, protocol, {"model_type": "unknown"})  # one the estimator cannot size


def test_ray_without_ray_installed_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(BackendUnavailableError, match=r"pip install 'quantkit\[ray\]'"):
        RayExecutor()
    assert main(["compare", "--ray", "--methods", "fp32", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "pip install 'quantkit[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
