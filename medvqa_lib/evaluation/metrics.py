"""Per-question scoring (exact match, token recall) and accuracy summaries.

Predictions are always joined to samples by ``qid``, never by list position.
Summaries are in percent and keep exact-match accuracy and token recall apart:
``closed_acc``/``open_acc``/``overall_acc`` are exact match, ``open_recall`` is the
open-set token recall that LLaVA-Med style papers report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from medvqa_lib.errors import DataError
from medvqa_lib.evaluation.normalize import _to_text, normalize_answer

__all__ = [
    "SCORE_COLUMNS",
    "SUMMARY_COLUMNS",
    "exact_match",
    "token_recall",
    "score_predictions",
    "summarize",
]

SCORE_COLUMNS: tuple[str, ...] = (
    "qid",
    "image_id",
    "dataset",
    "split",
    "answer_type",
    "question_type",
    "organ",
    "modality",
    "question",
    "answer",
    "prediction",
    "norm_answer",
    "norm_prediction",
    "exact",
    "recall",
)

SUMMARY_COLUMNS: tuple[str, ...] = (
    "n",
    "n_closed",
    "n_open",
    "closed_acc",
    "open_acc",
    "open_recall",
    "overall_acc",
)

_ANSWER_TYPES = ("closed", "open")
_SHOWN_QIDS = 5


def exact_match(answer: Any, prediction: Any) -> bool:
    """Whether the two strings are equal after :func:`normalize_answer`."""
    return normalize_answer(answer) == normalize_answer(prediction)


def _recall_from_norm(norm_answer: str, norm_prediction: str) -> float:
    answer_tokens = Counter(norm_answer.split())
    if not answer_tokens:
        return float(norm_answer == norm_prediction)
    common = answer_tokens & Counter(norm_prediction.split())
    return sum(common.values()) / sum(answer_tokens.values())


def token_recall(answer: Any, prediction: Any) -> float:
    """Share of the normalised answer tokens that also occur in the prediction.

    Tokens are counted as a multiset (an answer token that occurs twice must occur twice
    in the prediction). An answer that normalises to nothing scores 1.0 only against an
    empty prediction.

    >>> token_recall("left lung", "the lung")
    0.5
    """
    return _recall_from_norm(normalize_answer(answer), normalize_answer(prediction))


def _short_list(qids: Sequence[str]) -> str:
    shown = ", ".join(repr(q) for q in qids[:_SHOWN_QIDS])
    return shown + (", ..." if len(qids) > _SHOWN_QIDS else "")


def _duplicates(keys: Iterable[str]) -> list[str]:
    return [k for k, n in Counter(keys).items() if n > 1]


def _prediction_map(predictions: Any) -> dict[str, str]:
    """``{qid: prediction text}`` from a mapping (or a ``pandas.Series`` indexed by qid)."""
    if isinstance(predictions, (str, bytes)) or not hasattr(predictions, "items"):
        raise DataError(
            "predictions must be a mapping {qid: answer} (got "
            f"{type(predictions).__name__}); they are joined by qid, never by list order"
        )
    items = [(str(q), _to_text(p)) for q, p in predictions.items()]
    dup = _duplicates(q for q, _ in items)
    if dup:
        raise DataError(f"{len(dup)} duplicate prediction qids: {_short_list(dup)}")
    return dict(items)


def _check_join(qids: list[str], preds: Mapping[str, str]) -> None:
    dup = _duplicates(qids)
    if dup:
        raise DataError(f"{len(dup)} duplicate sample qids: {_short_list(dup)}")
    missing = [q for q in qids if q not in preds]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(qids)} samples have no prediction "
            f"(first: {_short_list(missing)}); predictions are joined by qid"
        )
    known = set(qids)
    unknown = sorted(q for q in preds if q not in known)
    if unknown:
        raise DataError(
            f"{len(unknown)} predictions have qids that match no sample "
            f"(first: {_short_list(unknown)}); are the predictions from another split?"
        )


def _score_row(sample: Any, prediction: str) -> dict[str, Any]:
    if sample.answer_type not in _ANSWER_TYPES:
        raise DataError(
            f"sample {sample.qid!r} has answer_type {sample.answer_type!r}; "
            "expected 'closed' or 'open'"
        )
    answer = _to_text(sample.answer)
    norm_answer = normalize_answer(answer)
    norm_prediction = normalize_answer(prediction)
    return {
        "qid": str(sample.qid),
        "image_id": sample.image_id,
        "dataset": sample.dataset,
        "split": sample.split,
        "answer_type": sample.answer_type,
        "question_type": sample.question_type,
        "organ": sample.organ,
        "modality": sample.modality,
        "question": sample.question,
        "answer": answer,
        "prediction": prediction,
        "norm_answer": norm_answer,
        "norm_prediction": norm_prediction,
        "exact": norm_answer == norm_prediction,
        "recall": _recall_from_norm(norm_answer, norm_prediction),
    }


def score_predictions(samples: Sequence[Any], predictions: Mapping[str, Any]) -> pd.DataFrame:
    """One row per sample with its prediction, normalised forms, ``exact`` and ``recall``.

    ``predictions`` maps qid -> predicted answer. Raises :class:`DataError` when a sample
    has no prediction, when qids repeat, or when a prediction's qid matches no sample.
    A ``phrase_type`` column is added when any sample has ``extra["phrase_type"]``.
    """
    samples = list(samples)
    preds = _prediction_map(predictions)
    _check_join([str(s.qid) for s in samples], preds)
    rows = [_score_row(s, preds[str(s.qid)]) for s in samples]
    frame = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    frame["exact"] = frame["exact"].astype(bool)
    frame["recall"] = frame["recall"].astype(float)
    if any((s.extra or {}).get("phrase_type") is not None for s in samples):
        frame["phrase_type"] = [(s.extra or {}).get("phrase_type") for s in samples]
    return frame


def _percent(values: pd.Series) -> float:
    return float(values.astype(float).mean() * 100.0) if len(values) else float("nan")


def summary_row(scored: pd.DataFrame) -> dict[str, Any]:
    """The :data:`SUMMARY_COLUMNS` for one table of scored rows (percent; NaN if empty)."""
    closed = scored[scored["answer_type"] == "closed"]
    open_ = scored[scored["answer_type"] == "open"]
    return {
        "n": len(scored),
        "n_closed": len(closed),
        "n_open": len(open_),
        "closed_acc": _percent(closed["exact"]),
        "open_acc": _percent(open_["exact"]),
        "open_recall": _percent(open_["recall"]),
        "overall_acc": _percent(scored["exact"]),
    }


def _as_by(by: str | Sequence[str] | None) -> list[str]:
    if by is None:
        return []
    return [by] if isinstance(by, str) else list(by)


def _check_columns(scored: pd.DataFrame, needed: Iterable[str]) -> None:
    missing = [c for c in needed if c not in scored.columns]
    if missing:
        raise DataError(
            f"scored table has no column(s) {missing}; available: {list(scored.columns)}"
        )


def iter_groups(
    scored: pd.DataFrame, by: str | Sequence[str] | None
) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """Yield ``({group column: value}, rows)`` for each group (one group when ``by`` is None)."""
    keys = _as_by(by)
    _check_columns(scored, ["answer_type", "exact", "recall", *keys])
    if not keys:
        yield {}, scored
        return
    for values, rows in scored.groupby(keys, sort=True, dropna=False, observed=True):
        values = values if isinstance(values, tuple) else (values,)
        yield dict(zip(keys, values, strict=True)), rows


def summarize(scored: pd.DataFrame, by: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Accuracy summary in percent, optionally per group.

    Columns: the ``by`` columns, then ``n, n_closed, n_open, closed_acc, open_acc,
    open_recall, overall_acc``. Accuracies are exact match; ``open_recall`` is token
    recall on open questions. A group without closed (or open) questions gets NaN there.
    """
    keys = _as_by(by)
    rows = [{**group, **summary_row(rows)} for group, rows in iter_groups(scored, keys)]
    frame = pd.DataFrame(rows, columns=[*keys, *SUMMARY_COLUMNS])
    for col in ("n", "n_closed", "n_open"):
        frame[col] = frame[col].astype(np.int64)
    return frame
