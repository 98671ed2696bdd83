"""Data-parallel calibration (quantkit.distributed): two gloo ranks on this CPU against one process."""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.builtin_backends.aqlm.config import AQLMConfig
from quantkit.builtin_backends.gptq import backend
from quantkit.core.linears import quantizable_linears
from quantkit.distributed import TIMEOUT_ENV, Distributed, DistributedError, session
from quantkit.layerwise import REPORT_ATTR, HessianAccumulator, quantize_layerwise
from quantkit.testing.models import tiny_llama, token_ids

NSAMPLES, SEQLEN = 8, 32
EVAL = token_ids(2, SEQLEN, seed=1)
CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32},
    "gptq-parallel": {"quant_method": "gptq", "bits": 4, "group_size": 32, "true_sequential": False, "desc_act": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32},
    "aqlm": AQLMConfig(num_codebooks=2, nbits_per_codebook=8, beam_size=2, rounds=1, codebook_steps=3, kmeans_iters=3),
}


def _quantize(name: str) -> torch.nn.Module:
    model = tiny_llama(0, hidden=64, intermediate=128, vocab=256, outliers=True)
    return quantkit.quantize(model, CONFIGS[name], calibration=token_ids(NSAMPLES, SEQLEN), device="cpu")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(EVAL).logits


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_configs() -> dict:
    """Every config quantized by this process (tensors, this rank's work, logits on EVAL), and the importance matrix."""
    results = {}
    for name in CONFIGS:
        model = _quantize(name)
        work = vars(getattr(model, REPORT_ATTR).work)
        results[name] = {"state": model.state_dict(), "work": work, "logits": _logits(model)}
    model = tiny_llama(0, hidden=64, intermediate=128, vocab=256, outliers=True)
    matrix = quantkit.collect_imatrix(model, token_ids(NSAMPLES, SEQLEN))
    results["imatrix"] = {"sums": matrix.sums, "counts": matrix.counts}
    return results


def _worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: every config's results, then a run in which rank 1 dies in layer 1."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ[TIMEOUT_ENV] = "60"
    torch.set_num_threads(1)
    torch.save(_run_configs(), Path(out) / f"rank{rank}.pt")
    if rank == 1:
        solve = backend._GPTQLayerQuantizer.__call__

        def die(self, ctx):
            if ctx.index == 1:
                os._exit(3)
            solve(self, ctx)

        backend._GPTQLayerQuantizer.__call__ = die
    try:
        quantkit.save(_quantize("gptq"), Path(out) / "model")
    except quantkit.QuantkitError as exc:
        (Path(out) / f"error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")


def _run_ranks(target, *args) -> list[int]:
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=target, args=(rank, *args)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(900)  # a guard against a hang only: a rank waits at most TIMEOUT_ENV for another
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    return [proc.exitcode for proc in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two gloo ranks' results (``"ranks"``, by rank; ``"out"``, their folder, ``"exitcodes"``)
    and this process's (``"single"``)."""
    out = tmp_path_factory.mktemp("ranks")
    exitcodes = _run_ranks(_worker, _free_port(), str(out))
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run_configs()
    finally:
        torch.set_num_threads(threads)
    return {"ranks": ranks, "single": single, "out": out, "exitcodes": exitcodes}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_two_ranks_give_one_process_bits(runs, name: str) -> None:
    """Statistics are summed in float64, where their order does not show: no mode to ask for."""
    alone = runs["single"][name]
    for rank in range(2):
        ranked = runs["ranks"][rank][name]
        assert ranked["state"].keys() == alone["state"].keys()
        assert not [key for key in alone["state"] if not torch.equal(ranked["state"][key], alone["state"][key])]
        assert torch.equal(ranked["logits"], alone["logits"])


@pytest.mark.slow
def test_importance_matrix_of_two_ranks_is_one_process_s(runs) -> None:
    alone = runs["single"]["imatrix"]
    for rank in range(2):
        ranked = runs["ranks"][rank]["imatrix"]
        assert ranked["counts"] == alone["counts"] == dict.fromkeys(alone["sums"], NSAMPLES * SEQLEN)
        assert ranked["sums"].keys() == alone["sums"].keys() and len(alone["sums"]) == 2 * 7
        for name, sums in alone["sums"].items():  # float64 sums of float32 squares: equal to ~1e-16
            torch.testing.assert_close(ranked["sums"][name], sums, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_each_rank_does_half_the_work(runs) -> None:
    for name in CONFIGS:
        works = [runs["ranks"][rank][name]["work"] for rank in range(2)]
        alone = runs["single"][name]["work"]
        for field in ("samples", "forward_tokens", "hessian_flops"):
            assert [w[field] for w in works] == [alone[field] / 2] * 2, (name, field)
        assert sum(w["solves"] for w in works) == alone["solves"], name
        assert sum(w["solve_cost"] for w in works) == pytest.approx(alone["solve_cost"]), name
        for work in works:  # balanced to within a quarter of the total
            assert abs(work["solve_cost"] - alone["solve_cost"] / 2) <= alone["solve_cost"] / 4, (name, works)


@pytest.mark.slow
def test_a_dying_rank_fails_the_run_without_output(runs) -> None:
    assert runs["exitcodes"] == [0, 3]
    assert not (runs["out"] / "model").exists()
    message = (runs["out"] / "error0.txt").read_text()
    assert message.startswith("DistributedError: rank 0 of 2:"), message
    assert "another rank exited" in message


def test_one_process_is_the_identity() -> None:
    dist = session()
    assert (dist.rank, dist.world, dist.is_main) == (0, 1, True)
    x = torch.randn(5, 3)
    assert dist.all_reduce(x.clone()).equal(x) and dist.broadcast(x, 0) is x
    assert dist.sample_ids(4).tolist() == [0, 1, 2, 3]
    acc = HessianAccumulator(3)
    acc.add_batch(x)
    assert acc.reduce() is acc.H


def test_owners_balance_the_costs() -> None:
    dist = Distributed(rank=1, world=3)
    owners = dist.owners([8.0, 1.0, 4.0, 4.0, 2.0])
    assert owners == [0, 2, 1, 2, 1]
    assert dist.loads == [8.0, 6.0, 5.0]
    assert Distributed(world=2).sample_ids(5).tolist() == [0, 2, 4]


@pytest.mark.parametrize(("variable", "value"), [(TIMEOUT_ENV, "soon"), (TIMEOUT_ENV, "0"), ("WORLD_SIZE", "x")])
def test_bad_settings_are_named(monkeypatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(DistributedError, match=f"{variable}={value!r} is invalid; allowed"):
        session()


def test_more_ranks_than_samples_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(quantkit.layerwise, "session", lambda: Distributed(rank=0, world=32))
    with pytest.raises(DistributedError, match=f"{NSAMPLES} calibration samples cannot be shared by 32 ranks"):
        _quantize("gptq")


def test_a_pipeline_that_does_not_reduce_is_refused_on_several_ranks(monkeypatch) -> None:
    monkeypatch.setattr(quantkit.layerwise, "session", lambda: Distributed(rank=0, world=2))
    model = tiny_llama(0, hidden=64, intermediate=128, vocab=256)
    targets = quantizable_linears(model, quantkit.GPTQConfig())
    with pytest.raises(DistributedError, match="stats does not calibrate data-parallel: launch it without torchrun"):
        quantize_layerwise(model, targets, token_ids(NSAMPLES, SEQLEN), "cpu", lambda ctx: None, description="stats")
