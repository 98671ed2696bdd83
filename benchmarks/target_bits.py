"""Automatic mixed precision (``quantize --target-bits``) on SmolLM2-135M: KL against stored bits.

    python benchmarks/target_bits.py --cache /tmp/tb.json   # GGUF and RTN at 3.5, 4.0, 4.5 bits
    python benchmarks/target_bits.py --methods gguf,rtn,gptq --targets 3.5,4.0,4.5,5.0 \
        --gptq-targets 3.5,4.0,4.5 --cache /tmp/tb.json       # the committed results

A rerun with the same ``--cache`` reuses every measured row and sensitivity (and says so).

Protocol of ``quantkit compare`` (pydoc text, 4096 evaluation tokens in windows of 512, KL of the
next-token distribution against the float model, 2 threads): the uniform methods and llama.cpp
mixes of ``benchmarks/results/results.json`` (same protocol key) are the baselines; the mixes
missing there, uniform GGUF Q4_1 and uniform RTN and GPTQ below 4 bits are measured here.
Sensitivities come from 8 x 512 calibration tokens (the calibration split, disjoint from the
evaluation text). For each target the automatic mix is quantized and evaluated like every other
row, and compared with every uniform method and llama.cpp mix of no more stored bits per
parameter (quantized linears, as ``compare`` counts).

It also checks which sensitivity measure predicts KL better: the Fisher-weighted output error
(the default) or the plain output error, by the rank correlation of each with the measured KL of
every GGUF config measured, and by the KL of the mix each one chooses at each feasible target.
The embedded SmolLM2 was published as Q4_1 (its "float" weights are Q4_1's decoded values), so
Q4_1 stores its linears exactly: the GGUF mixes use that, and say little about other models there.
Writes ``benchmarks/results/target_bits.txt`` and ``benchmarks/results/kl_vs_bits.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from run_log import RunLog

from quantkit.api import quantize
from quantkit.autobits import Sensitivity, measure_sensitivity
from quantkit.autobits.choose import candidate_options
from quantkit.builtin_backends.gguf.convert import linear_type
from quantkit.builtin_backends.gguf.mixes import ModelShape
from quantkit.calibration import calibration_tokens, evaluation_tokens
from quantkit.compare.protocol import Protocol
from quantkit.core.errors import ConfigValueError
from quantkit.core.linears import quantizable_linears
from quantkit.core.resolve import preset
from quantkit.estimate import estimate
from quantkit.evaluate import evaluate
from quantkit.models import load_model

RESULTS = Path(__file__).parent / "results"
MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M")
EXTRA_UNIFORM = {
    "rtn-3bit-g128": ("rtn", {"bits": 3, "group_size": 128}),
    "rtn-3bit-g64": ("rtn", {"bits": 3, "group_size": 64}),
    "gptq-3bit-g64": ("gptq", {"bits": 3, "group_size": 64}),
}
"""Uniform points below 4 bits, which the committed comparison lacks (GPTQ calibrated as ``compare`` does)."""


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="gguf,rtn", help="among gguf, rtn, gptq")
    parser.add_argument("--targets", default="3.5,4.0,4.5")
    parser.add_argument("--gptq-targets", help="targets of the GPTQ mixes, 4 min each (default: --targets)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the text file and plot")
    parser.add_argument(
        "--cache", type=Path, help="a JSON file of measured rows and sensitivities: reused on a rerun, said so"
    )
    args = parser.parse_args()
    protocol = Protocol()
    calibration_fields = {"gptq": {"dataset": protocol.dataset, "nsamples": protocol.calibration_samples}}

    def base_config(method: str, fields: dict | None = None):
        """The method's preset with ``fields``, calibrated (GPTQ) as ``compare`` does."""
        return preset(method, {**(fields or {}), **calibration_fields.get(method, {})})

    torch.set_num_threads(protocol.threads)
    log = RunLog("target_bits.py")
    log.emit(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    methods, targets = args.methods.split(","), [float(t) for t in args.targets.split(",")]
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.is_file() else {}
    model, tokenizer = load_model()
    model_config = model.config.to_dict()
    eval_ids = evaluation_tokens(tokenizer, protocol.dataset, max_tokens=protocol.eval_tokens)
    calib = calibration_tokens(tokenizer, protocol.dataset, nsamples=args.nsamples, seqlen=512, seed=protocol.seed)
    scratch = Path(tempfile.mkdtemp(prefix="target-bits-"))
    reference = scratch / "reference.npy"
    window = {"seqlen": protocol.seqlen, "stride": protocol.stride}
    base = evaluate(model, eval_ids, **window, write_reference=reference)
    log.emit(f"float32 perplexity {base.perplexity:.3f} on {base.scored_tokens} tokens")

    committed = {
        r["method"]: (r["bits_per_param"], r["kl_divergence"], r["config"])
        for r in json.loads((RESULTS / "results.json").read_text())
        if r["status"] == "ok" and r["kl_divergence"] is not None and r["protocol_key"] == protocol.key()
    }
    rows: dict[str, tuple[float, float, str]] = {}  # label -> (bits, KL, kind)
    for name, (bits, kl, config) in committed.items():
        kind = "mix" if config and config.get("quant_type") in MIXES else "uniform"
        rows[name] = (bits, kl, kind)

    def save_cache() -> None:
        if args.cache:
            args.cache.write_text(json.dumps(cache))

    def measure(label: str, config, kind: str) -> tuple[float, float]:
        bits = estimate(config=config, model_config=model_config).bits_per_param
        key = f"{label} {config.to_json_string(diff=True)}"
        if key in cache.get("rows", {}):
            kl = cache["rows"][key]
            log.emit(f"  {label}: {bits:.4f} bits/param, KL {kl:.4f} (measured by an earlier run, --cache)")
        else:
            start = time.perf_counter()
            quantized = quantize(copy.deepcopy(model), config, tokenizer=tokenizer)
            kl = evaluate(quantized, eval_ids, **window, reference=reference).kl_divergence
            log.emit(f"  {label}: {bits:.4f} bits/param, KL {kl:.4f} ({time.perf_counter() - start:.0f} s)")
            cache.setdefault("rows", {})[key] = kl
            save_cache()
        rows[label] = (bits, kl, kind)
        return bits, kl

    def sensitivity_of(method: str, weighting: str) -> Sensitivity:
        key = f"{method} {weighting} {args.nsamples}"
        start = time.perf_counter()
        if key in cache.get("sensitivity", {}):
            sensitivity = candidate_options(model, base_config(method))
            for layer, losses in zip(sensitivity.layers, cache["sensitivity"][key]):
                layer.losses = [losses[json.dumps(s, sort_keys=True)] for s in layer.settings]
            how = "(measured by an earlier run, --cache)"
        else:
            sensitivity = measure_sensitivity(model, base_config(method), calib, weighting=weighting)
            cache.setdefault("sensitivity", {})[key] = [
                {json.dumps(s, sort_keys=True): x for s, x in zip(layer.settings, layer.losses)}
                for layer in sensitivity.layers
            ]
            save_cache()
            how = f"in {time.perf_counter() - start:.0f} s"
        low, high = sensitivity.bits_range()
        log.emit(
            f"{method}: {weighting} sensitivity of {len(sensitivity.layers)} linears {how}; "
            f"feasible {low:.4f} to {high:.4f} bits/param"
        )
        return sensitivity

    auto: dict[str, list[tuple[float, float, float]]] = {}

    def mixes_of(method: str, sensitivity: Sensitivity, weighting: str, chosen_targets: list[float]) -> dict:
        configs = {}
        for target in chosen_targets:
            label = f"auto-{method}-{target}" + ("" if weighting == "fisher" else f"-{weighting}")
            try:
                choice = sensitivity.allocate(target)
            except ConfigValueError as exc:
                log.emit(f"  {label}: not feasible: {exc}")
                continue
            configs[label] = config = sensitivity.config_for(choice)
            counts: dict[str, int] = {}
            for setting in choice.values():
                key = ",".join(f"{v}" for v in setting.values())
                counts[key] = counts.get(key, 0) + 1
            bits, kl = measure(label, config, "auto")
            log.emit(f"    predicted loss {sensitivity.totals(choice)[1]:.4f}; settings {dict(sorted(counts.items()))}")
            if weighting == "fisher":
                auto.setdefault(method, []).append((target, bits, kl))
        return configs

    def checkpoint() -> None:
        summary(log, rows, auto)
        plot(rows, auto, targets, args.results / "kl_vs_bits.png")
        (args.results / "target_bits.txt").write_text("\n".join(log.lines) + "\n(partial: the run goes on)\n")

    if "gguf" in methods:
        fisher = sensitivity_of("gguf", "fisher")
        gguf_configs = mixes_of("gguf", fisher, "fisher", targets)
        log.emit("llama.cpp mixes (committed rows where results.json has them, else measured):")
        for mix in MIXES:
            config = preset("gguf", {"quant_type": mix})
            bits = estimate(config=config, model_config=model_config).bits_per_param
            gguf_configs[f"gguf-{mix.lower()}"] = config
            if f"gguf-{mix.lower()}" in committed:
                kl = rows[f"gguf-{mix.lower()}"][1]
                log.emit(f"  gguf-{mix.lower()}: {bits:.4f} bits/param, KL {kl:.4f} (results.json)")
            elif bits <= max(targets):
                measure(f"gguf-{mix.lower()}", config, "mix")
            else:  # above every target: no rival of an automatic mix
                log.emit(f"  gguf-{mix.lower()}: {bits:.4f} bits/param, above every target: not measured")
        gguf_configs["gguf-q4_0"], gguf_configs["gguf-q8_0"] = preset("gguf-q4_0"), preset("gguf-q8_0")
        log.emit("uniform Q4_1, the type the embedded model's linears were published in (it stores them exactly):")
        gguf_configs["gguf-q4_1"] = preset("gguf", {"quant_type": "Q4_1"})
        measure("gguf-q4_1", gguf_configs["gguf-q4_1"], "uniform")
        checkpoint()
        output = sensitivity_of("gguf", "output")
        feasible = [t for t in targets if output.bits_range()[0] <= t]
        gguf_configs.update(mixes_of("gguf", output, "output", feasible))
        prediction_check(log, model, {"fisher": fisher, "output": output}, gguf_configs, rows)
        checkpoint()
    if "rtn" in methods:
        mixes_of("rtn", sensitivity_of("rtn", "fisher"), "fisher", targets)
        checkpoint()
        log.emit("uniform methods below 4 bits:")
        for label, (method, fields) in EXTRA_UNIFORM.items():
            measure(label, base_config(method, fields), "uniform")
    if "gptq" in methods:
        gptq_targets = [float(t) for t in args.gptq_targets.split(",")] if args.gptq_targets else targets
        mixes_of("gptq", sensitivity_of("gptq", "fisher"), "fisher", gptq_targets)
    summary(log, rows, auto)
    plot(rows, auto, targets, args.results / "kl_vs_bits.png")
    log.write(args.results / "target_bits.txt")


def summary(log: RunLog, rows: dict, auto: dict) -> None:
    """Each automatic mix against the best uniform method or llama.cpp mix of no more stored bits."""
    log.emit("targets: the automatic mix against every uniform method and llama.cpp mix of no more stored bits")
    for method, points in auto.items():
        for target, bits, kl in points:
            rivals = [(k, b, v) for k, (b, v, kind) in rows.items() if kind != "auto" and b <= bits + 1e-9]
            best = min(rivals, key=lambda r: r[2]) if rivals else None
            met = best is None or kl < best[2]
            rival = f"{best[0]} at {best[1]:.4f} bits, KL {best[2]:.4f}" if best else "none"
            verdict = "MET" if met else "NOT MET"
            log.emit(f"  {method} {target}: {bits:.4f} bits, KL {kl:.4f}; best rival {rival} -> {verdict}")


def prediction_check(log: RunLog, model, sensitivities, configs: dict, rows: dict) -> None:
    """Rank correlation of each weighting's predicted loss with the measured KL of GGUF configs."""
    shape = ModelShape.of(model.config)
    names = [t.name for t in quantizable_linears(model, preset("gguf"))]
    in_features = {t.name: t.linear.in_features for t in quantizable_linears(model, preset("gguf"))}
    labels = [label for label in configs if label in rows]
    measured, predicted = [rows[label][1] for label in labels], {w: [] for w in sensitivities}
    for label in labels:
        config = configs[label]
        choice = {n: {"quant_type": linear_type(config.for_module(n), n, in_features[n], shape)} for n in names}
        for weighting, sensitivity in sensitivities.items():
            predicted[weighting].append(sensitivity.totals(choice)[1])
    log.emit(f"gguf: predicted loss vs measured KL over {len(labels)} configs ({', '.join(labels)}):")
    for weighting, values in predicted.items():
        ratios = [m / p for m, p in zip(measured, values) if p > 0]  # Q4_1 alone is predicted lossless
        log.emit(
            f"  {weighting}: Spearman {spearman(values, measured):+.3f}; measured/predicted "
            f"{min(ratios):.3g} to {max(ratios):.3g}"
        )


def plot(rows: dict, auto: dict, targets: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, target in enumerate(targets):
        ax.axvline(target, color="tab:green", lw=0.8, ls=":", label="targets (--target-bits)" if i == 0 else None)
    styles = {"uniform": ("o", "tab:gray", "uniform methods"), "mix": ("s", "tab:blue", "llama.cpp mixes")}
    for kind, (marker, color, label) in styles.items():
        points = [(b, v, k) for k, (b, v, kd) in rows.items() if kd == kind and b <= 9]
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=label)
        for b, v, k in points:
            ax.annotate(k, (b, v), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for method, points in auto.items():
        points = sorted(points)
        ax.plot([p[1] for p in points], [p[2] for p in points], "-^", label=f"automatic {method} mix (--target-bits)")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per parameter (quantized linears)")
    ax.set_ylabel("KL divergence from float32 (nats/token)")
    ax.set_title("SmolLM2-135M, pydoc evaluation text: KL vs stored bits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
