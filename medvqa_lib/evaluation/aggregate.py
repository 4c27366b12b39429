"""Mean ± std over seeds, and result tables that keep measured and reported numbers apart."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from medvqa_lib.errors import ConfigError, DataError

__all__ = [
    "MEASURED",
    "REPORTED",
    "RESULT_COLUMNS",
    "aggregate_seeds",
    "format_mean_std",
    "reported_row",
    "results_table",
]

MEASURED = "measured (this book)"
REPORTED = "reported (paper)"

RESULT_COLUMNS: tuple[str, ...] = (
    "label",
    "dataset",
    "closed",
    "closed_std",
    "open",
    "open_std",
    "open_recall",
    "open_recall_std",
    "overall",
    "overall_std",
    "n_seeds",
    "source",
    "paper",
    "note",
)

# result column -> summary column it is read from
_RESULT_METRICS = {
    "closed": "closed_acc",
    "open": "open_acc",
    "open_recall": "open_recall",
    "overall": "overall_acc",
}
_IGNORED_NUMERIC = frozenset({"seed"})


def _as_frame(table: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        frame = table
        if any(name is not None for name in frame.index.names):
            frame = frame.reset_index()
        return frame.reset_index(drop=True)
    if isinstance(table, Mapping):
        return pd.DataFrame([dict(table)])
    raise DataError(f"expected a DataFrame or a dict of metrics, got {type(table).__name__}")


def _is_metric(frame: pd.DataFrame, column: str) -> bool:
    series = frame[column]
    return is_numeric_dtype(series) and not is_bool_dtype(series) and column not in _IGNORED_NUMERIC


def aggregate_seeds(tables: Sequence[pd.DataFrame | Mapping[str, Any]]) -> pd.DataFrame:
    """Mean and std (ddof=1) of every numeric column over per-seed tables.

    Each table is one seed's summary (a :func:`summarize` frame or a dict of metrics).
    Non-numeric columns (e.g. ``question_type``) are group keys. Output columns: the keys,
    then ``<metric>_mean`` and ``<metric>_std`` per metric, then ``n_seeds``. With one
    seed every std is NaN.
    """
    if not tables:
        raise DataError("aggregate_seeds needs at least one table")
    frames = [_as_frame(t) for t in tables]
    columns = list(frames[0].columns)
    for i, frame in enumerate(frames[1:], start=1):
        if set(frame.columns) != set(columns):
            raise DataError(
                f"seed table {i} has columns {sorted(frame.columns)}, table 0 has {sorted(columns)}"
            )
    metrics = [c for c in columns if _is_metric(frames[0], c)]
    keys = [c for c in columns if c not in metrics and c not in _IGNORED_NUMERIC]
    stacked = pd.concat([f[columns] for f in frames], ignore_index=True)
    if keys:
        grouped = stacked.groupby(keys, sort=False, dropna=False, observed=True)[metrics]
        mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.size()
    else:
        values = stacked[metrics]
        mean, std = values.mean().to_frame().T, values.std(ddof=1).to_frame().T
        count = pd.Series([len(values)])
    out = pd.DataFrame(index=mean.index)
    for metric in metrics:
        out[f"{metric}_mean"] = mean[metric].astype(float)
        out[f"{metric}_std"] = std[metric].astype(float)
    out["n_seeds"] = count.to_numpy()
    return out.reset_index() if keys else out.reset_index(drop=True)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_mean_std(mean: float | None, std: float | None, digits: int = 1) -> str:
    """``"71.2 ± 0.8"``; just ``"71.2"`` when std is missing/NaN; ``"n/a"`` for no mean."""
    if _is_missing(mean):
        return "n/a"
    if _is_missing(std):
        return f"{float(mean):.{digits}f}"
    return f"{float(mean):.{digits}f} ± {float(std):.{digits}f}"


def _check_percent(name: str, value: float | None) -> float:
    if _is_missing(value):
        return float("nan")
    value = float(value)
    if not 0.0 <= value <= 100.0:
        raise ConfigError(f"reported {name} must be a percentage in [0, 100], got {value}")
    return value


def reported_row(
    paper: str,
    dataset: str,
    closed: float | None,
    open: float | None,
    overall: float | None,
    note: str = "",
) -> pd.DataFrame:
    """A one-row table of numbers quoted from a paper, always labelled ``REPORTED``.

    Values are percentages; pass ``None`` for a number the paper does not report.
    """
    return pd.DataFrame(
        [
            {
                "paper": paper,
                "dataset": dataset,
                "closed_acc": _check_percent("closed", closed),
                "open_acc": _check_percent("open", open),
                "overall_acc": _check_percent("overall", overall),
                "source": REPORTED,
                "note": note,
            }
        ]
    )


def _metric_value(record: Mapping[str, Any], column: str) -> tuple[float, float]:
    """(value, std) from either a summary column or an aggregated ``_mean``/``_std`` pair."""
    if f"{column}_mean" in record:
        return float(record[f"{column}_mean"]), float(record.get(f"{column}_std", math.nan))
    if column in record:
        return float(record[column]), math.nan
    return math.nan, math.nan


def _result_row(label: str, record: Mapping[str, Any]) -> dict[str, Any]:
    source = record.get("source", MEASURED)
    if _is_missing(source):
        source = MEASURED
    if source not in (MEASURED, REPORTED):
        raise DataError(f"row {label!r} has source {source!r}; use {MEASURED!r} or {REPORTED!r}")
    row: dict[str, Any] = {"label": label, "dataset": record.get("dataset", "")}
    for name, column in _RESULT_METRICS.items():
        row[name], row[f"{name}_std"] = _metric_value(record, column)
    default_seeds = 1 if source == MEASURED else math.nan
    row["n_seeds"] = record.get("n_seeds", default_seeds)
    row["source"] = source
    row["paper"] = record.get("paper", "") if source == REPORTED else ""
    row["note"] = record.get("note", "")
    return row


def results_table(rows: Mapping[str, pd.DataFrame | Mapping[str, Any]]) -> pd.DataFrame:
    """A tidy comparison table, one row per (label, table row), with a ``source`` column.

    ``rows`` maps a label (e.g. ``"MISS, 3 seeds"``) to a :func:`summarize` frame, an
    :func:`aggregate_seeds` frame, or a :func:`reported_row`. Rows without a ``source``
    are this book's measurements; only :func:`reported_row` produces ``REPORTED`` rows.
    Extra text columns of a table (e.g. ``question_type``) are kept.
    """
    out = []
    for label, table in rows.items():
        frame = _as_frame(table)
        if not any(
            c in frame.columns or f"{c}_mean" in frame.columns for c in _RESULT_METRICS.values()
        ):
            raise DataError(f"table {label!r} has no accuracy columns: {list(frame.columns)}")
        for record in frame.to_dict(orient="records"):
            row = _result_row(label, record)
            for key, value in record.items():
                if (
                    key not in row
                    and isinstance(value, str)
                    and not key.endswith(("_mean", "_std"))
                ):
                    row[key] = value
            out.append(row)
    frame = pd.DataFrame(out)
    if frame.empty:
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    extra = [c for c in frame.columns if c not in RESULT_COLUMNS]
    return frame[[*RESULT_COLUMNS, *extra]]
