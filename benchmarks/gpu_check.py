"""Every CUDA claim of every registered backend and kernel, checked in one command on one GPU.

    python benchmarks/gpu_check.py --dry-run     # list the claims (any machine)
    python benchmarks/gpu_check.py               # check them (needs CUDA; about 5 minutes at most)
    python benchmarks/gpu_check.py --width 4096 14336 --exclude aqlm   # at Llama-3-8B's widths

The claims come from the registry, not from a list kept here: each backend whose capabilities
declare CUDA for quantization (``quantize B P on cuda``: quantize with preset P on the GPU, logits
finite; every preset of a calibration-free backend, the first of a calibrated one) or inference
(``run B P on cuda``: forward, save and reload on the GPU, the same checkpoint loaded on the CPU,
dequantized, as the reference), and each kernel declaring a CUDA device
(``kernel K on cuda``: forced on every layer of the quantized models it can serve, logits against
the dequantize reference, and its time per call against float16 ``F.linear`` of the same shapes).
The model is the cached SmolLM2-135M cut to its first two decoder layers (real weights and
shapes, 576 wide) when quantkit's cache holds it, else a random Llama 1024 wide. Calibration: random
token ids (the checks are of mechanics, not quality). Each line of the results file
(``benchmarks/results/gpu_check.txt``) is ``PASS``, ``FAIL`` or ``SKIP (reason)`` and the claim;
a claim left when ``--budget`` seconds are spent is skipped. Exit status: 0 when nothing failed,
1 when a claim failed, 2 without a CUDA device (unless ``--dry-run``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from run_log import RunLog  # this folder's scripts import each other when run
from torch import nn
from torch.nn import functional as F

import quantkit
from quantkit.core.backend import Backend
from quantkit.core.dispatch import chosen_kernel, chosen_kernels, set_kernel
from quantkit.core.hardware import Hardware
from quantkit.core.kernels import Kernel, check
from quantkit.core.registry import get_registry
from quantkit.models import DEFAULT_MODEL_NAME, cache_dir
from quantkit.testing import tiny_llama

RESULTS = Path(__file__).parent / "results" / "gpu_check.txt"
NO_GPU = 2
CALIBRATION = (16, 256)
"""Random calibration token ids: (samples, tokens); more samples where the widest linear has more
inputs than their tokens (or its statistics would be rank-deficient)."""
PROMPT = (2, 32)
LOGITS_TOLERANCE = 0.02
"""Relative error allowed between the GPU's logits and the CPU reference's (float16 on one side)."""
ACTIVATION_TOLERANCE = 0.06
"""The same against the dequantize reference for kernels that quantize activations (their
``activation_bits``): per-row int8 activations alone moved the random Llama's logits by 0.035
(bitsandbytes' LLM.int8 on the CPU)."""
RANDOM_HIDDEN, RANDOM_INTERMEDIATE = 1024, 2816
"""The random Llama's widths: a 1B model's, so that kernel timings are of more than launches."""
SPEED_ROWS = (1, 16)
SPEED_SHAPES = 3


@dataclass(frozen=True)
class Claim:
    """One CUDA claim: ``kind`` quantize, run or kernel, of ``subject`` (a backend, with one of its
    presets when it has some, or a kernel)."""

    kind: str
    subject: Backend | Kernel
    preset: str | None = None

    @property
    def name(self) -> str:
        label = self.subject.label if isinstance(self.subject, Kernel) else self.subject.name
        return f"{self.kind} {label}{f' {self.preset}' if self.preset else ''} on cuda"

    @property
    def key(self) -> str:
        """The quantized model's name: the preset's, else the backend's."""
        return self.preset or self.subject.name


def cuda_claims() -> list[Claim]:
    """Every CUDA claim the registry declares: backends' quantize and run (calibration-free ones
    first, with each of their presets, so that every layer format meets its kernels; calibrated
    ones last, with their first preset, their solves being the slow part), then kernels (on the
    models the backends quantized)."""
    registry = get_registry()
    claims = []
    for backend in sorted(registry.backends.values(), key=lambda b: (b.capabilities.requires_calibration, b.name)):
        capabilities = backend.capabilities
        presets = [preset.name for preset in backend.presets] or [None]
        for preset in presets[:1] if capabilities.requires_calibration else presets:
            if Hardware.CUDA in capabilities.quantize_hardware:
                claims.append(Claim("quantize", backend, preset))
            if Hardware.CUDA in capabilities.inference_hardware:
                claims.append(Claim("run", backend, preset))
    claims += [Claim("kernel", k) for k in registry.kernels if Hardware.CUDA in k.devices]
    return claims


def float_model(width: tuple[int, int] | None = None) -> tuple[nn.Module, str]:
    """SmolLM2's first two decoder layers from quantkit's cache, else (or with ``width``, its
    hidden and intermediate sizes) a random Llama of two layers."""
    folder = cache_dir() / DEFAULT_MODEL_NAME
    if width is None and (folder / "model.safetensors").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, num_hidden_layers=2, dtype=torch.float32)
        return model.eval(), f"{DEFAULT_MODEL_NAME} (first 2 decoder layers, from {folder})"
    hidden, intermediate = width or (RANDOM_HIDDEN, RANDOM_INTERMEDIATE)
    return (
        tiny_llama(0, hidden=hidden, intermediate=intermediate, layers=2, vocab=512),
        f"random Llama (2 decoder layers, hidden {hidden}, intermediate {intermediate})",
    )


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float().cpu(), expected.float().cpu()
    return ((got - expected).norm() / expected.norm()).item()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids.to(next(model.parameters()).device)).logits.float().cpu()


def dispatched(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose forward runs a registered kernel."""
    modules = dict(model.named_modules())
    return [modules[name] for name in chosen_kernels(model)]


def logits_tolerance(kernels: Iterable[Kernel | None]) -> float:
    """:data:`ACTIVATION_TOLERANCE` where one of ``kernels`` quantizes activations, else
    :data:`LOGITS_TOLERANCE`."""
    quantized = any(kernel is not None and kernel.activation_bits is not None for kernel in kernels)
    return ACTIVATION_TOLERANCE if quantized else LOGITS_TOLERANCE


def milliseconds(call: Callable[[], object], device: str, repeats: int = 50) -> float:
    """Mean time of ``call`` on ``device`` over ``repeats`` calls queued back to back, in ms, after
    warm-up: the device's time per call where it exceeds the host's time to launch one."""
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    for _ in range(3):
        call()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


class Checker:
    """Runs the claims in order, keeping the quantized models the kernel claims need. ``device``
    is ``cuda`` but for smoke tests of this script itself on a machine without a GPU."""

    def __init__(self, model: nn.Module, vocab: int, workdir: Path, device: str = "cuda"):
        self.model, self.workdir, self.device = model, workdir, device
        gen = torch.Generator().manual_seed(0)
        widest = max(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
        samples, tokens = CALIBRATION
        self.calibration = torch.randint(0, vocab, (max(samples, widest // tokens + 1), tokens), generator=gen)
        self.ids = torch.randint(0, vocab, PROMPT, generator=gen)
        self.float_logits = logits(model, self.ids)
        self.on_gpu: dict[str, nn.Module] = {}
        """A claim's key -> its quantized model on the device."""

    def quantized(self, claim: Claim, device: str) -> nn.Module:
        backend = claim.subject
        config = quantkit.as_config(claim.preset) if claim.preset else backend.config_class()
        calibration = self.calibration if backend.capabilities.requires_calibration else None
        return quantkit.quantize(copy.deepcopy(self.model), config, calibration=calibration, device=device)

    def quantize(self, claim: Claim) -> str:
        start = time.perf_counter()
        model = self.quantized(claim, self.device)
        out = logits(model, self.ids)
        if not torch.isfinite(out).all():
            raise AssertionError("non-finite logits")
        self.on_gpu[claim.key] = model
        error = relative_error(out, self.float_logits)
        return f"in {time.perf_counter() - start:.1f} s; logits vs float {error:.3f}"

    def run(self, claim: Claim) -> str:
        backend = claim.subject
        model = self.on_gpu.get(claim.key) or self.quantized(claim, "cpu")
        folder = quantkit.save(model, self.workdir / claim.key)
        loaded = quantkit.load(folder, device=self.device)
        self.on_gpu[claim.key] = loaded
        out = logits(loaded, self.ids)
        if not torch.isfinite(out).all():
            raise AssertionError("non-finite logits after reload")
        kernels = sorted(set(chosen_kernels(loaded).values()) - {None})
        if Hardware.CPU in backend.capabilities.inference_hardware:
            tolerance = logits_tolerance(map(chosen_kernel, dispatched(loaded)))
            reference_model = quantkit.load(folder, device="cpu")
            for module in dispatched(reference_model):
                set_kernel(module, "dequantize")
            reference, against = logits(reference_model, self.ids), "the CPU load (dequantize)"
        else:
            reference, against, tolerance = self.float_logits, "the float model", 0.5
        error = relative_error(out, reference)
        if error > tolerance:
            raise AssertionError(f"logits differ from {against} by {error:.4f} > {tolerance}")
        kernels = ", ".join(kernels) or "own forward"
        return f"reloaded on {self.device}; logits vs {against} {error:.4f}; kernels {kernels}"

    def kernel(self, claim: Claim) -> str:
        kernel = claim.subject
        served = {
            name: [m for m in dispatched(model) if kernel.serves(m) and check(kernel, m, self.device, None)]
            for name, model in self.on_gpu.items()
        }
        served = {name: modules for name, modules in served.items() if modules}
        if not served:
            return "SKIP (no layer of the quantized models is one it serves on this GPU)"
        parts = []
        for name, modules in served.items():
            model = self.on_gpu[name]
            for module in modules:
                set_kernel(module, "dequantize")
            reference = logits(model, self.ids)
            for module in modules:
                set_kernel(module, kernel.name)
            error = relative_error(logits(model, self.ids), reference)
            tolerance = logits_tolerance([kernel])
            if error > tolerance:
                raise AssertionError(f"{name}: logits differ from dequantize's by {error:.4f} > {tolerance}")
            speed = self.speed(kernel, modules)
            parts.append(f"{name} {len(modules)} layers, logits vs dequantize {error:.4f}; {speed}")
            for module in modules:
                set_kernel(module, None)
        return " | ".join(parts)

    def speed(self, kernel: Kernel, modules: list[nn.Module]) -> str:
        dtype = torch.float16 if torch.float16 in kernel.dtypes else kernel.dtypes[0]
        shapes = {}
        for module in modules:
            shapes.setdefault((module.out_features, module.in_features), module)
        timings = []
        for (out, inp), module in list(shapes.items())[:SPEED_SHAPES]:
            weight = torch.randn(out, inp, dtype=torch.float16, device=self.device)
            for rows in SPEED_ROWS:
                x = torch.randn(rows, inp, device=self.device)
                with torch.inference_mode():
                    ours = milliseconds(partial(module, x.to(dtype)), self.device)
                    fp16 = milliseconds(partial(F.linear, x.half(), weight), self.device)
                timings.append(f"{rows}x{inp}->{out} {ours:.3f} ms vs fp16 {fp16:.3f} ms ({fp16 / ours:.2f}x)")
        return "speed " + ", ".join(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the claims and exit")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds after which claims left are skipped")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--width", type=int, nargs=2, metavar=("HIDDEN", "INTERMEDIATE"), help="a random Llama of these widths"
    )
    parser.add_argument("--exclude", nargs="*", default=[], help="skip the claims whose name holds one of these")
    args = parser.parse_args()
    claims = cuda_claims()
    if args.dry_run:
        print(f"{len(claims)} CUDA claims declared by the registry:")
        for claim in claims:
            print(f"  {claim.name}")
        return 0
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing checked. "
            "Run it where a GPU is, or pass --dry-run to list the claims.",
            file=sys.stderr,
        )
        return NO_GPU
    log = RunLog("gpu_check.py")
    log.emit(f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    start = time.perf_counter()
    model, description = float_model(args.width)
    log.emit(f"model: {description}")
    failed = False
    with tempfile.TemporaryDirectory() as workdir:
        checker = Checker(model, model.config.vocab_size, Path(workdir))
        steps = {"quantize": checker.quantize, "run": checker.run, "kernel": checker.kernel}
        for claim in claims:
            if time.perf_counter() - start > args.budget:
                log.emit(f"SKIP (time budget of {args.budget:.0f} s spent) {claim.name}")
                continue
            if any(text in claim.name for text in args.exclude):
                log.emit(f"SKIP (--exclude) {claim.name}")
                continue
            try:
                detail = steps[claim.kind](claim)
                status = "PASS"
                if detail.startswith("SKIP"):
                    status, detail = detail, ""
                log.emit(f"{status} {claim.name}" + (f": {detail}" if detail else ""))
            except Exception as exc:  # every failure is a result of the check, reported and counted
                failed = True
                where = traceback.extract_tb(exc.__traceback__)[-1]
                reason = str(exc).splitlines()[0] if str(exc) else ""
                at = f"{Path(where.filename).name}:{where.lineno}"
                log.emit(f"FAIL {claim.name}: {type(exc).__name__}: {reason} (at {at})")
    log.emit(f"total {time.perf_counter() - start:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log.write(args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
