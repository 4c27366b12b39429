"""Guards that make it impossible to tune, select or fit anything on the test split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from medvqa_lib.errors import ConfigError, DataError

__all__ = ["ensure_splits", "split_counts"]

_SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def _split_of(sample: Any) -> str:
    if isinstance(sample, Mapping):
        if "split" not in sample:
            raise DataError(f"record has no 'split' field: {dict(sample)!r}")
        return str(sample["split"])
    if not hasattr(sample, "split"):
        raise DataError(f"{type(sample).__name__} object has no 'split' attribute")
    return str(sample.split)


def split_counts(samples: Iterable[Any]) -> dict[str, int]:
    """Number of samples per split, in order of first appearance."""
    return dict(Counter(_split_of(s) for s in samples))


def _describe(allowed: Iterable[str]) -> str:
    words = [_SPLIT_WORDS.get(s, repr(s)) for s in sorted(allowed, key=_split_order)]
    return " or ".join(words)


def _split_order(split: str) -> tuple[int, str]:
    order = list(_SPLIT_WORDS)
    return (order.index(split) if split in order else len(order), split)


def ensure_splits(samples: Iterable[Any], allowed: Iterable[str], purpose: str) -> None:
    """Raise :class:`DataError` if any sample's split is not in ``allowed``.

    ``samples`` are :class:`VQASample` objects (or mappings with a ``"split"`` key).
    Example message: ``"model selection must use validation data only; got 451 samples
    from split 'test'"``.
    """
    if isinstance(allowed, str):
        allowed = {allowed}
    allowed = set(allowed)
    if not allowed:
        raise ConfigError(f"{purpose}: no allowed split given")
    bad = {split: n for split, n in split_counts(samples).items() if split not in allowed}
    if not bad:
        return
    parts = [
        f"{bad[split]} {'sample' if bad[split] == 1 else 'samples'} from split {split!r}"
        for split in sorted(bad, key=_split_order)
    ]
    raise DataError(f"{purpose} must use {_describe(allowed)} data only; got {' and '.join(parts)}")
