"""Named configs that backends declare: short method names for the CLI and the comparison."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A config of one method under a short name, e.g. ``nf4`` or ``gguf-q4_k_m``.

    ``fields`` are the config's fields (``quant_method`` comes from the backend that
    declares the preset). ``comparison_rank`` places the preset in ``quantkit compare``'s
    default list (ascending; ``None`` leaves it out).
    """

    name: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    comparison_rank: float | None = None
    doc: str = ""
