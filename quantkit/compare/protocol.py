"""The protocol of a comparison: what every method is measured on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigValueError


def digest(data: Any) -> str:
    """A short hash of JSON-able ``data``: the keys results are filed under."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


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
    kernel: str | None = None
    """The kernel forced on every quantized linear (``None``: each runs the fastest valid one)."""
    prompt_tokens: int = 128
    repeats: int = 3
    """Evaluations of a method whose backend is not deterministic (its result keeps their spread).
    Part of those methods' keys (:attr:`Method.evaluations`), not of the protocol's: changing it
    re-measures only them."""

    def __post_init__(self) -> None:
        positive = (
            "eval_tokens",
            "seqlen",
            "stride",
            "calibration_samples",
            "calibration_seqlen",
            "threads",
            "decode_tokens",
            "prompt_tokens",
            "repeats",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigValueError("Protocol", name, value, "a positive int")
        if self.seqlen < 2 or self.stride > self.seqlen:
            raise ConfigValueError("Protocol", "stride", self.stride, f"1..seqlen ({self.seqlen}), seqlen >= 2")

    def to_dict(self) -> dict[str, Any]:
        """The fields every method is measured on (``repeats`` is in the keys of the methods it concerns)."""
        data = dataclasses.asdict(self)
        del data["repeats"]
        if data["kernel"] is None:  # the keys of protocols from before kernels existed stay the same
            del data["kernel"]
        return data

    def key(self) -> str:
        """A short hash: results measured under another protocol are never mixed in."""
        return digest(self.to_dict())

    def describe(self) -> str:
        """The protocol in words, as the report and the terminal state it."""
        model = self.model or "embedded SmolLM2-135M-Instruct"
        return (
            f"model {model}; text {self.dataset!r} (calibration and evaluation splits are disjoint); "
            f"evaluation: first {self.eval_tokens} tokens, windows of {self.seqlen} every {self.stride}; "
            f"calibration: {self.calibration_samples} x {self.calibration_seqlen} tokens (seed {self.seed}); "
            f"device {self.device}, {self.threads} threads; decode: {self.decode_tokens} greedy tokens "
            f"after a {self.prompt_tokens}-token prompt" + (f"; kernel {self.kernel}" if self.kernel else "")
        )
