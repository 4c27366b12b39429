"""Evaluation: answer normalisation, per-question scores, summaries, CIs and baselines."""

from medvqa_lib.evaluation.aggregate import (
    MEASURED,
    REPORTED,
    aggregate_seeds,
    format_mean_std,
    reported_row,
    results_table,
)
from medvqa_lib.evaluation.answers import UNK, AnswerVocabulary, coverage
from medvqa_lib.evaluation.bootstrap import (
    bootstrap_ci,
    format_ci_table,
    paired_bootstrap,
    summarize_with_ci,
)
from medvqa_lib.evaluation.guards import ensure_splits, split_counts
from medvqa_lib.evaluation.metrics import (
    exact_match,
    score_predictions,
    summarize,
    token_recall,
)
from medvqa_lib.evaluation.normalize import normalize_answer, normalized_tokens
from medvqa_lib.evaluation.prior import QuestionOnlyPrior
from medvqa_lib.evaluation.text_metrics import bleu, rouge, rouge_scores, sentence_bleu_scores

__all__ = [
    "MEASURED",
    "REPORTED",
    "UNK",
    "AnswerVocabulary",
    "QuestionOnlyPrior",
    "aggregate_seeds",
    "bleu",
    "bootstrap_ci",
    "coverage",
    "ensure_splits",
    "exact_match",
    "format_ci_table",
    "format_mean_std",
    "normalize_answer",
    "normalized_tokens",
    "paired_bootstrap",
    "reported_row",
    "results_table",
    "rouge",
    "rouge_scores",
    "score_predictions",
    "sentence_bleu_scores",
    "split_counts",
    "summarize",
    "summarize_with_ci",
    "token_recall",
]
