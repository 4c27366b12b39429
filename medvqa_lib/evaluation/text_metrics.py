"""BLEU and ROUGE for free-text answers (in percent).

BLEU uses sacrebleu with its standard ``13a`` tokenisation, case-sensitive by default,
one reference per prediction. Corpus BLEU uses sacrebleu's default ``exp`` smoothing;
per-item BLEU (:func:`sentence_bleu_scores`) additionally uses the effective n-gram
order, so a one-word answer that matches its one-word reference scores 100 instead of 0.
ROUGE is the F1 of ``rouge_score`` with the Porter stemmer; its tokenizer keeps only
``[a-z0-9]`` tokens. An empty prediction or reference scores 0 under both metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from medvqa_lib.errors import DataError
from medvqa_lib.evaluation.normalize import _to_text

__all__ = ["ROUGE_TYPES", "bleu", "sentence_bleu_scores", "rouge", "rouge_scores"]

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")


def _pair_texts(
    predictions: Sequence[str], references: Sequence[str]
) -> tuple[list[str], list[str]]:
    preds = [_to_text(p) for p in predictions]
    refs = [_to_text(r) for r in references]
    if len(preds) != len(refs):
        raise DataError(f"got {len(preds)} predictions but {len(refs)} references")
    return preds, refs


def bleu(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    max_order: int = 4,
    lowercase: bool = False,
) -> float:
    """Corpus BLEU (sacrebleu, ``13a`` tokens, ``exp`` smoothing); NaN for no pairs."""
    preds, refs = _pair_texts(predictions, references)
    if not preds:
        return float("nan")
    metric = BLEU(
        tokenize="13a", smooth_method="exp", max_ngram_order=max_order, lowercase=lowercase
    )
    return float(metric.corpus_score(preds, [refs]).score)


def sentence_bleu_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    max_order: int = 4,
    lowercase: bool = False,
) -> list[float]:
    """Per-item BLEU (sacrebleu sentence BLEU, ``exp`` smoothing, effective order)."""
    preds, refs = _pair_texts(predictions, references)
    metric = BLEU(
        tokenize="13a",
        smooth_method="exp",
        max_ngram_order=max_order,
        lowercase=lowercase,
        effective_order=True,
    )
    return [float(metric.sentence_score(p, [r]).score) for p, r in zip(preds, refs, strict=True)]


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> pd.DataFrame:
    """Per-item ROUGE-1/2/L F1 in percent, one row per pair."""
    preds, refs = _pair_texts(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = []
    for pred, ref in zip(preds, refs, strict=True):
        scores = scorer.score(ref, pred)
        rows.append({k: 100.0 * float(scores[k].fmeasure) for k in ROUGE_TYPES})
    return pd.DataFrame(rows, columns=list(ROUGE_TYPES), dtype=float)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 in percent: ``{"rouge1", "rouge2", "rougeL"}`` (NaN if empty)."""
    per_item = rouge_scores(predictions, references)
    if per_item.empty:
        return {k: float("nan") for k in ROUGE_TYPES}
    return {k: float(np.mean(per_item[k])) for k in ROUGE_TYPES}
