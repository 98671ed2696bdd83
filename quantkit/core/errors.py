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
        super().__init__(f"{config}.{field}={value!r} has type {type(value).__name__}; expected {expected}")


class UnknownFieldError(QuantkitError, ValueError):
    """A dict given to a config holds a key the config does not have."""

    def __init__(self, config: str, key: str, known: Iterable[str]):
        self.config, self.field = config, key
        super().__init__(f"{config} has no field {key!r}{did_you_mean(key, known)}")


class UnknownNameError(QuantkitError, ValueError):
    """A name nothing registered (a method, preset, dataset, command, plugin).

    The message suggests the closest registered name (or ``hint`` instead), lists the
    registered ones under ``listing`` and ends with ``note``.
    """

    def __init__(
        self, field: str, name: object, known: Iterable[str], *, listing: str, hint: str | None = None, note: str = ""
    ):
        known = sorted(set(known))
        self.field, self.name, self.known = field, name, known
        hint = did_you_mean(name, known) if hint is None else hint
        super().__init__(f"{field}={name!r} is unknown{hint}; {listing}: {', '.join(known) or '(none)'}{note}")


class UnknownMethodError(UnknownNameError):
    """No registered config or backend has this ``quant_method`` (nor is it an alias or preset)."""

    def __init__(
        self,
        method: object,
        known: Iterable[str],
        *,
        listing: str = "registered methods",
        hint: str | None = None,
        note: str = "",
    ):
        self.method = method
        super().__init__("quant_method", method, known, listing=listing, hint=hint, note=note)


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


class SaveError(QuantkitError, OSError):
    """Saving failed (disk full, file-size limit, read-only or blocked target); the previous output is kept.

    Built as ``SaveError(errno, message)`` when the cause's errno is known, so ``errno`` tells a
    full disk (``ENOSPC``) from a size limit (``EFBIG``) or a permission problem.
    """


def did_you_mean(word: object, candidates: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest candidate (case ignored), or ``""``."""
    if not isinstance(word, str):
        return ""
    by_folded = {c.lower(): c for c in candidates if isinstance(c, str)}
    close = difflib.get_close_matches(word.lower(), list(by_folded), n=1)
    return f"; did you mean {by_folded[close[0]]!r}?" if close else ""


class MemoryBudgetError(QuantkitError, RuntimeError):
    """A run's predicted peak memory exceeds its memory budget (``max_memory``), even with its
    calibration activations spilled to disk: raised before any heavy work. ``predicted``: the
    lowest peak predicted for the run, which is the smallest budget that would work (bytes)."""

    def __init__(self, message: str, *, predicted: int, budget: int):
        self.predicted, self.budget = predicted, budget
        super().__init__(message)
