"""Per-question scoring, summaries, strict qid join, BLEU and ROUGE."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import sacrebleu

from medvqa_lib.data.schema import VQASample
from medvqa_lib.errors import DataError
from medvqa_lib.evaluation import (
    bleu,
    exact_match,
    rouge,
    rouge_scores,
    score_predictions,
    sentence_bleu_scores,
    summarize,
    token_recall,
)


def make(qid, answer, answer_type, question_type="other", phrase_type=None) -> VQASample:
    extra = {} if phrase_type is None else {"phrase_type": phrase_type}
    return VQASample(
        qid=qid,
        image_id=f"img_{qid}",
        image=None,
        question=f"question {qid}?",
        answer=answer,
        answer_type=answer_type,
        question_type=question_type,
        organ="chest",
        split="test",
        dataset="toy",
        modality="ct",
        extra=extra,
    )


@pytest.fixture
def samples():
    return [
        make("q1", "yes", "closed", "presence", "freeform"),
        make("q2", "no", "closed", "presence", "para"),
        make("q3", "CT", "closed", "modality", "freeform"),
        make("q4", "left lung", "open", "position", "freeform"),
        make("q5", "right upper lobe", "open", "position", "para"),
    ]


@pytest.fixture
def predictions():
    # closed: 2 of 3 right; open: 1 of 2 exact, recall 1 and 1/3
    return {
        "q5": "upper lung",
        "q4": "Left Lung.",
        "q3": "the ct",
        "q2": "yes",
        "q1": "Yes",
    }


def test_exact_and_recall_helpers():
    assert exact_match("The CT.", "ct")
    assert not exact_match("yes", "no")
    assert token_recall("right upper lobe", "upper lung") == pytest.approx(1 / 3)
    assert token_recall("left lung", "the lung") == 0.5
    assert token_recall("2 2", "2") == 0.5
    assert token_recall("the", "") == 1.0
    assert token_recall("the", "yes") == 0.0


def test_score_rows(samples, predictions):
    scored = score_predictions(samples, predictions)
    assert list(scored["qid"]) == ["q1", "q2", "q3", "q4", "q5"]
    assert list(scored["exact"]) == [True, False, True, True, False]
    assert list(scored["recall"]) == pytest.approx([1.0, 0.0, 1.0, 1.0, 1 / 3])
    assert scored.loc[2, "norm_prediction"] == "ct"
    assert scored.loc[3, "prediction"] == "Left Lung."
    assert list(scored["phrase_type"]) == ["freeform", "para", "freeform", "freeform", "para"]
    for col in ("image_id", "dataset", "split", "organ", "modality", "norm_answer"):
        assert col in scored.columns


def test_no_phrase_type_column_without_extra():
    scored = score_predictions([make("a", "yes", "closed")], {"a": "yes"})
    assert "phrase_type" not in scored.columns


def test_summary_by_hand(samples, predictions):
    summary = summarize(score_predictions(samples, predictions))
    row = summary.iloc[0]
    assert (row["n"], row["n_closed"], row["n_open"]) == (5, 3, 2)
    assert row["closed_acc"] == pytest.approx(200 / 3)  # 66.7
    assert row["open_acc"] == pytest.approx(50.0)
    assert row["open_recall"] == pytest.approx(100 * (1 + 1 / 3) / 2)  # 66.7
    assert row["overall_acc"] == pytest.approx(60.0)


def test_summary_grouping(samples, predictions):
    summary = summarize(score_predictions(samples, predictions), by="question_type")
    summary = summary.set_index("question_type")
    assert list(summary.index) == ["modality", "position", "presence"]
    assert summary.loc["presence", "closed_acc"] == pytest.approx(50.0)
    assert math.isnan(summary.loc["presence", "open_acc"])
    assert math.isnan(summary.loc["presence", "open_recall"])
    assert summary.loc["modality", "n"] == 1
    assert summary.loc["modality", "closed_acc"] == pytest.approx(100.0)
    assert math.isnan(summary.loc["position", "closed_acc"])
    assert summary.loc["position", "open_acc"] == pytest.approx(50.0)
    assert summary.loc["position", "open_recall"] == pytest.approx(200 / 3)


def test_summary_two_keys_and_phrase_type(samples, predictions):
    scored = score_predictions(samples, predictions)
    by_two = summarize(scored, by=["answer_type", "phrase_type"])
    assert list(by_two.columns[:2]) == ["answer_type", "phrase_type"]
    assert len(by_two) == 4
    para = summarize(scored, by="phrase_type").set_index("phrase_type").loc["para"]
    assert para["overall_acc"] == pytest.approx(0.0)


def test_summary_errors_and_empty(samples, predictions):
    scored = score_predictions(samples, predictions)
    with pytest.raises(DataError, match="no column"):
        summarize(scored, by="nonexistent")
    empty = summarize(scored.iloc[0:0])
    assert empty.loc[0, "n"] == 0
    assert math.isnan(empty.loc[0, "overall_acc"])


def test_join_is_by_qid_not_order(samples, predictions):
    reordered = dict(reversed(list(predictions.items())))
    pd.testing.assert_frame_equal(
        score_predictions(samples, predictions), score_predictions(samples, reordered)
    )


def test_missing_prediction(samples, predictions):
    del predictions["q2"], predictions["q4"]
    with pytest.raises(DataError, match=r"2 of 5 samples have no prediction.*'q2', 'q4'"):
        score_predictions(samples, predictions)


def test_unknown_prediction(samples, predictions):
    predictions["q99"] = "yes"
    with pytest.raises(DataError, match="match no sample.*'q99'"):
        score_predictions(samples, predictions)


def test_duplicate_sample_qids(samples, predictions):
    with pytest.raises(DataError, match="duplicate sample qids.*'q1'"):
        score_predictions([*samples, make("q1", "yes", "closed")], predictions)


def test_list_predictions_rejected(samples):
    with pytest.raises(DataError, match="mapping"):
        score_predictions(samples, ["yes", "no", "ct", "left lung", "lobe"])


def test_series_predictions_and_none(samples, predictions):
    predictions["q1"] = None
    scored = score_predictions(samples, pd.Series(predictions))
    assert scored.loc[0, "prediction"] == ""
    assert not scored.loc[0, "exact"]


def test_bad_answer_type():
    with pytest.raises(DataError, match="answer_type"):
        score_predictions([make("a", "yes", "CLOSED")], {"a": "yes"})


# --- BLEU / ROUGE -------------------------------------------------------------------


def test_bleu_identical():
    texts = ["the cat sat on the mat", "there is a mass in the left lung"]
    assert bleu(texts, texts) == pytest.approx(100.0)


def test_bleu_partial_by_hand():
    hyp, ref = ["the cat sat on the mat"], ["the cat is on the mat"]
    # precisions 5/6, 3/5, 1/4, and 0/3 smoothed to 1/(2*3); brevity penalty 1
    by_hand = 100 * ((5 / 6) * (3 / 5) * (1 / 4) * (1 / 6)) ** 0.25
    assert bleu(hyp, ref) == pytest.approx(by_hand, abs=1e-6)
    assert bleu(hyp, ref) == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref]).score)


def test_sentence_bleu():
    scores = sentence_bleu_scores(["lung", "left lung", ""], ["lung", "right lung", "liver"])
    assert scores[0] == pytest.approx(100.0)
    assert 0.0 < scores[1] < 100.0
    assert scores[2] == 0.0
    expected = sacrebleu.sentence_bleu("left lung", ["right lung"]).score
    assert scores[1] == pytest.approx(expected)


def test_bleu_empty_and_mismatch():
    assert bleu([""], [""]) == 0.0
    assert math.isnan(bleu([], []))
    with pytest.raises(DataError):
        bleu(["a"], ["a", "b"])


def test_rouge_by_hand():
    scores = rouge(["the cat on the mat"], ["the cat sat on the mat"])
    # LCS 5: precision 5/5, recall 5/6 -> F1 10/11
    assert scores["rougeL"] == pytest.approx(100 * 10 / 11)
    assert scores["rouge1"] == pytest.approx(100 * 10 / 11)
    # bigrams: 3 shared, 4 predicted, 5 reference -> F1 2/3
    assert scores["rouge2"] == pytest.approx(100 * 2 / 3)


def test_rouge_stemming_and_empty():
    assert rouge(["lesions"], ["lesion"])["rouge1"] == pytest.approx(100.0)
    per_item = rouge_scores(["", "yes"], ["no", ""])
    assert per_item.to_numpy().sum() == 0.0
    assert all(math.isnan(v) for v in rouge([], []).values())
