"""Bootstrap confidence intervals and paired comparisons of two models.

The percentile bootstrap is written with numpy rather than ``scipy.stats.bootstrap``:
accuracy values are often all 0 or all 1 inside a small group, and the interval should
then collapse to the point instead of coming back as NaN with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from medvqa_lib.errors import ConfigError, DataError
from medvqa_lib.evaluation.metrics import iter_groups, summary_row

__all__ = ["bootstrap_ci", "summarize_with_ci", "paired_bootstrap"]

_CHUNK_ELEMENTS = 2_000_000
_CI_METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("closed_acc", "exact", "closed"),
    ("open_acc", "exact", "open"),
    ("open_recall", "recall", "open"),
    ("overall_acc", "exact", None),
)


def _check_settings(n_resamples: int, confidence: float) -> None:
    if int(n_resamples) < 1:
        raise ConfigError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be between 0 and 1, got {confidence}")


def _as_values(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if np.isnan(arr).any():
        raise DataError("bootstrap values contain NaN; drop or fill them first")
    return arr


def _apply_rows(statistic: Callable[..., Any], block: np.ndarray) -> np.ndarray:
    """``statistic`` of every row of ``block`` (vectorised when it takes ``axis``)."""
    try:
        out = np.asarray(statistic(block, axis=1), dtype=float)
        if out.shape == (block.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(statistic(row)) for row in block])


def _resampled_statistics(
    values: np.ndarray, statistic: Callable[..., Any], n_resamples: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // n))
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        out[start : start + size] = _apply_rows(statistic, values[idx])
    return out


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_ci(
    values: Any,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[..., Any] = np.mean,
) -> tuple[float, float, float]:
    """``(point, low, high)``: the statistic and its percentile-bootstrap interval.

    Deterministic for a given ``seed``. Empty input gives ``(nan, nan, nan)``.
    """
    _check_settings(n_resamples, confidence)
    arr = _as_values(values)
    if arr.size == 0:
        return (float("nan"),) * 3
    point = float(statistic(arr))
    stats = _resampled_statistics(arr, statistic, int(n_resamples), seed)
    low, high = _percentile_interval(stats, confidence)
    return point, low, high


def _subset(rows: pd.DataFrame, column: str, answer_type: str | None) -> np.ndarray:
    if answer_type is not None:
        rows = rows[rows["answer_type"] == answer_type]
    return rows[column].to_numpy(dtype=float) * 100.0


def summarize_with_ci(
    scored: pd.DataFrame,
    by: str | Sequence[str] | None = None,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`summarize` plus ``<metric>_low`` / ``<metric>_high`` bootstrap bounds (percent).

    Each metric (closed_acc, open_acc, open_recall, overall_acc) is resampled over its
    own questions.
    """
    keys = [by] if isinstance(by, str) else list(by or [])
    rows = []
    for group, part in iter_groups(scored, keys):
        row: dict[str, Any] = {**group, **summary_row(part)}
        for name, column, answer_type in _CI_METRICS:
            _, low, high = bootstrap_ci(
                _subset(part, column, answer_type),
                n_resamples=n_resamples,
                confidence=confidence,
                seed=seed,
            )
            row[f"{name}_low"], row[f"{name}_high"] = low, high
        rows.append(row)
    columns = [*keys, "n", "n_closed", "n_open"]
    for name, _, _ in _CI_METRICS:
        columns += [name, f"{name}_low", f"{name}_high"]
    return pd.DataFrame(rows, columns=columns)


def _metric_by_qid(scored: pd.DataFrame, metric: str, label: str) -> pd.Series:
    for col in ("qid", metric):
        if col not in scored.columns:
            raise DataError(f"scored table {label} has no column {col!r}")
    qids = scored["qid"].astype(str)
    if qids.duplicated().any():
        raise DataError(f"scored table {label} has duplicate qids")
    return pd.Series(scored[metric].to_numpy(dtype=float), index=qids.to_numpy()).sort_index()


def _paired_differences(
    scored_a: pd.DataFrame, scored_b: pd.DataFrame, metric: str, answer_type: str | None
) -> np.ndarray:
    a = _metric_by_qid(scored_a, metric, "a")
    b = _metric_by_qid(scored_b, metric, "b")
    only_a, only_b = a.index.difference(b.index), b.index.difference(a.index)
    if len(only_a) or len(only_b):
        raise DataError(
            f"the two scored tables cover different questions: {len(only_a)} qids only in a "
            f"(e.g. {list(only_a[:3])}), {len(only_b)} only in b (e.g. {list(only_b[:3])})"
        )
    if answer_type is not None:
        keep = scored_a.loc[scored_a["answer_type"] == answer_type, "qid"].astype(str)
        a, b = a.loc[a.index.isin(keep)], b.loc[b.index.isin(keep)]
    return (a.to_numpy() - b.loc[a.index].to_numpy()) * 100.0


def paired_bootstrap(
    scored_a: pd.DataFrame,
    scored_b: pd.DataFrame,
    *,
    metric: str = "exact",
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    answer_type: str | None = None,
) -> dict[str, float]:
    """Paired bootstrap of ``mean(a) - mean(b)`` over the same questions (joined by qid).

    Returns ``delta`` (percentage points), its percentile interval ``low``/``high``, a
    two-sided ``p_value`` for "no difference" (share of resampled deltas, centred on
    ``delta``, at least as far from it as ``delta`` is from 0, with a +1 correction) and
    ``n``. ``answer_type`` restricts the comparison to "closed" or "open" questions.
    Raises :class:`DataError` if the two tables cover different qids.
    """
    _check_settings(n_resamples, confidence)
    diffs = _paired_differences(scored_a, scored_b, metric, answer_type)
    if diffs.size == 0:
        nan = float("nan")
        return {"delta": nan, "low": nan, "high": nan, "p_value": nan, "n": 0}
    delta = float(diffs.mean())
    stats = _resampled_statistics(diffs, np.mean, int(n_resamples), seed)
    low, high = _percentile_interval(stats, confidence)
    extreme = np.count_nonzero(np.abs(stats - delta) >= abs(delta) - 1e-12)
    p_value = (extreme + 1) / (int(n_resamples) + 1)
    return {
        "delta": delta,
        "low": low,
        "high": high,
        "p_value": float(min(1.0, p_value)),
        "n": int(diffs.size),
    }


CI_METRICS = {"closed_acc": "closed", "open_acc": "open", "open_recall": "open recall",
              "overall_acc": "overall"}


def format_ci_table(table: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """A readable copy of a :func:`summarize_with_ci` table: ``"49.3 [43.0, 55.5]"`` per metric.

    Keeps the question counts, drops index levels without a name (pandas' default 0, 1, …).
    """
    frame = table.copy()
    unnamed = [i for i, name in enumerate(frame.index.names) if name is None]
    if unnamed and frame.index.nlevels > 1:
        frame = frame.droplevel(unnamed)
    out = pd.DataFrame(index=frame.index)
    for col in ("n", "n_closed", "n_open"):
        if col in frame:
            out[col] = frame[col].astype(int)
    for col, label in CI_METRICS.items():
        if col in frame:
            out[label] = [
                "—" if np.isnan(v) else f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                for v, lo, hi in zip(frame[col], frame[f"{col}_low"], frame[f"{col}_high"], strict=True)
            ]
    return out
