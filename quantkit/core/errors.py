"""Every error quantkit raises on purpose derives from :class:`QuantkitError`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class QuantkitError(Exception):
    """Base class of all quantkit errors."""


class ConfigValueError(QuantkitError, ValueError):
    """A config field holds a value outside its allowed set or range."""

    def __init__(self, config: str, field: str, value: object, allowed: str):
        self.config, self.field, self.value, self.allowed = config, field, value, allowed
        super().__init__(f"{config}.{field}={value!r} is invalid; allowed: {allowed}")


class ConfigTypeError(QuantkitError, TypeError):
    """A config field holds a value of the wrong type."""

    def __init__(self, config: str, field: str, value: object, expected: str):
        self.config, self.field, self.value, self.expected = config, field, value, expected
        super().__init__(
            f"{config}.{field}={value!r} has type {type(value).__name__}; expected {expected}"
        )


class UnknownFieldError(QuantkitError, ValueError):
    """A dict given to a config holds a key the config does not have."""

    def __init__(self, config: str, key: str, known: Iterable[str]):
        self.config, self.field = config, key
        super().__init__(f"{config} has no field {key!r}{did_you_mean(key, known)}")


class UnknownMethodError(QuantkitError, ValueError):
    """No registered config or backend has this ``quant_method``."""

    def __init__(self, method: object, known: Iterable[str], note: str = ""):
        known = sorted(set(known))
        self.method = method
        super().__init__(
            f"quant_method={method!r} is unknown{did_you_mean(str(method), known)}; "
            f"registered methods: {', '.join(known) or '(none)'}{note}"
        )


class BackendUnavailableError(QuantkitError, RuntimeError):
    """The backend exists but cannot run here (missing package, failed plugin)."""


class UnsupportedHardwareError(QuantkitError, RuntimeError):
    """A backend was asked to run on hardware it does not declare."""


class NotTrainableError(QuantkitError, RuntimeError):
    """PEFT fine-tuning was asked of a backend that declares it unsupported."""


class ModelFormatError(QuantkitError, ValueError):
    """A model file or folder is missing, corrupt, truncated or of the wrong kind."""


class QuantizationError(QuantkitError, RuntimeError):
    """Quantizing failed (no quantizable layers, non-finite weights, bad calibration data)."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [c for c in candidates if isinstance(c, str)], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
