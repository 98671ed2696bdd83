"""The datasets quantkit registers itself, through the same hook as any plugin."""

from __future__ import annotations

from collections.abc import Callable

from .core.errors import QuantkitError
from .core.hookspecs import hookimpl
from .core.text import Dataset, split_text

OFFLINE_HINT = "use the offline built-in dataset 'pydoc' or a local .txt/.jsonl file instead"


def pydoc_text() -> str:
    """CPython's own documentation topics (~465 KB of English), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def _pydoc(split: str, max_chars: int) -> str:
    return split_text(pydoc_text(), split)[:max_chars]


def _hub(name: str, calibration: tuple, evaluation: tuple, field: str = "text") -> Callable[[str, int], str]:
    """A loader over the ``datasets`` package: ``(args, kwargs)`` per split."""

    def load(split: str, max_chars: int) -> str:
        try:
            import datasets
        except ImportError as exc:
            raise QuantkitError(f"dataset {name!r} needs the 'datasets' package; {OFFLINE_HINT}") from exc
        shared = calibration == evaluation  # one stream: cut it so the splits never overlap
        args, kwargs = calibration if split == "calibration" else evaluation
        budget = max_chars * 5 if shared else max_chars
        try:
            data = datasets.load_dataset(*args, **kwargs, streaming=True)
            parts, size = [], 0
            for record in data:
                text = record[field]
                if text.strip():
                    parts.append(text)
                    size += len(text)
                if size >= budget:
                    break
        except Exception as exc:
            raise QuantkitError(f"dataset {name!r} could not be loaded ({exc}); {OFFLINE_HINT}") from exc
        text = "\n\n".join(parts)
        return (split_text(text, split) if shared else text)[:max_chars]

    return load


@hookimpl
def quantkit_register_datasets(register) -> None:
    register(Dataset("pydoc", "Python's documentation topics, shipped with CPython (offline)", _pydoc))
    register(
        Dataset(
            "wikitext2",
            "WikiText-2 raw: train for calibration, test for evaluation (hub)",
            _hub(
                "wikitext2",
                ((("wikitext", "wikitext-2-raw-v1"), {"split": "train"})),
                ((("wikitext", "wikitext-2-raw-v1"), {"split": "test"})),
            ),
            offline=False,
        )
    )
    register(
        Dataset(
            "c4",
            "C4 English: train shard 0 for calibration, validation shard 0 for evaluation (hub)",
            _hub(
                "c4",
                ((("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"})),
                (
                    (
                        ("allenai/c4",),
                        {
                            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                            "split": "validation",
                        },
                    )
                ),
            ),
            offline=False,
        )
    )
    register(
        Dataset(
            "pileval",
            "The Pile validation sample AWQ calibrates on (hub)",
            _hub(
                "pileval",
                ((("mit-han-lab/pile-val-backup",), {"split": "validation"})),
                ((("mit-han-lab/pile-val-backup",), {"split": "validation"})),
            ),
            offline=False,
        )
    )
