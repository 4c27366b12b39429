"""Question-only prior and answer vocabulary (training data only)."""

from __future__ import annotations

import math

import pytest

from medvqa_lib.data.schema import VQASample
from medvqa_lib.errors import ConfigError, DataError, MedVQAError, UnknownNameError
from medvqa_lib.evaluation import (
    UNK,
    AnswerVocabulary,
    QuestionOnlyPrior,
    coverage,
    score_predictions,
    summarize,
)


def make(qid, question, answer, answer_type, question_type, split="train") -> VQASample:
    return VQASample(
        qid=qid,
        image_id="img",
        image=None,
        question=question,
        answer=answer,
        answer_type=answer_type,
        question_type=question_type,
        split=split,
    )


@pytest.fixture
def train():
    return [
        make("t1", "Is there a fracture?", "yes", "closed", "presence"),
        make("t2", "Is there a fracture?", "Yes", "closed", "presence"),
        make("t3", "Is there a mass?", "no", "closed", "presence"),
        make("t4", "is there a mass", "No.", "closed", "presence"),
        make("t5", "Is there edema?", "yes", "closed", "presence"),
        make("t6", "What modality is this?", "CT", "open", "modality"),
        make("t7", "what modality is this", "ct", "open", "modality"),
        make("t8", "Which imaging technique?", "MRI", "open", "modality"),
        make("t9", "What organ is shown?", "lung", "open", "organ"),
        make("t10", "What organ is shown?", "liver", "open", "organ", split="val"),
        make("t11", "What organ is shown?", "Lung", "open", "organ"),
    ]


@pytest.fixture
def test_set():
    return [
        make("p1", "Is there a mass?", "no", "closed", "presence", "test"),
        make("p2", "Is there a nodule?", "yes", "closed", "presence", "test"),
        make("p3", "What modality?", "ct", "open", "modality", "test"),
        make("p4", "Is it larger than 2 cm?", "no", "closed", "size", "test"),
        make("p5", "How big is it?", "2 cm", "open", "size", "test"),
    ]


def test_majority_per_question_type(train, test_set):
    prior = QuestionOnlyPrior().fit(train)
    assert prior.predict(test_set) == {
        "p1": "yes",  # presence: yes 3, no 2
        "p2": "yes",
        "p3": "ct",  # modality: ct 2, mri 1
        "p4": "yes",  # unseen type -> closed majority
        "p5": "ct",  # unseen type -> open majority, ct and lung tie at 2 -> alphabetical
    }
    assert prior.predict_levels(test_set) == {
        "p1": "question_type",
        "p2": "question_type",
        "p3": "question_type",
        "p4": "answer_type",
        "p5": "answer_type",
    }


def test_question_key_with_backoff(train, test_set):
    prior = QuestionOnlyPrior(key="question").fit(train)
    predictions = prior.predict(test_set)
    assert predictions["p1"] == "no"  # the exact question was answered "no" twice
    assert predictions["p2"] == "yes"  # unseen question -> presence majority
    levels = prior.predict_levels(test_set)
    assert (levels["p1"], levels["p2"]) == ("question", "question_type")


def test_question_min_count(train):
    edema = [make("e", "Is there edema?", "no", "closed", "presence", "test")]
    assert QuestionOnlyPrior(key="question").fit(train).predict_levels(edema) == {"e": "question"}
    assert QuestionOnlyPrior(key="question", min_count=2).fit(train).predict_levels(edema) == {
        "e": "question_type"
    }


def test_global_backoff(train):
    closed_only = [s for s in train if s.answer_type == "closed"]
    prior = QuestionOnlyPrior().fit(closed_only)
    sample = make("o", "What organ?", "lung", "open", "organ", "test")
    assert prior.predict([sample]) == {"o": "yes"}
    assert prior.predict_levels([sample]) == {"o": "global"}


def test_prior_scores_end_to_end(train, test_set):
    scored = score_predictions(test_set, QuestionOnlyPrior().fit(train).predict(test_set))
    row = summarize(scored).iloc[0]
    assert row["closed_acc"] == pytest.approx(100 / 3)  # p2 right; p1, p4 wrong
    assert row["open_acc"] == pytest.approx(50.0)  # p3 right, p5 wrong


def test_prior_refuses_test(train, test_set):
    with pytest.raises(DataError, match="got 5 samples from split 'test'"):
        QuestionOnlyPrior().fit(train + test_set)


def test_prior_misuse(train):
    with pytest.raises(MedVQAError, match="not fitted"):
        QuestionOnlyPrior().predict(train)
    with pytest.raises(UnknownNameError):
        QuestionOnlyPrior(key="image")
    with pytest.raises(DataError):
        QuestionOnlyPrior().fit([])


# --- answer vocabulary --------------------------------------------------------------


def test_vocabulary_order_and_lookup(train):
    vocab = AnswerVocabulary.from_samples(train)
    # counts: yes 3, ct 2, lung 2, no 2, liver 1, mri 1
    assert vocab.answers == ["yes", "ct", "lung", "no", "liver", "mri"]
    assert vocab.counts["yes"] == 3
    assert len(vocab) == 6
    assert vocab.encode("Yes.") == 0
    assert vocab.encode("The CT") == 1
    assert vocab.unk_index == 6 == vocab.encode("kidney")
    assert vocab.num_classes == 7
    assert vocab.decode(3) == "no"
    assert vocab.decode(vocab.unk_index) == UNK
    with pytest.raises(IndexError):
        vocab.decode(7)
    assert "LUNG" in vocab
    assert AnswerVocabulary.from_dict(vocab.to_dict()) == vocab


def test_vocabulary_min_count(train):
    assert AnswerVocabulary.from_samples(train, min_count=2).answers == ["yes", "ct", "lung", "no"]


def test_vocabulary_refuses_test(train, test_set):
    with pytest.raises(DataError, match="building the answer vocabulary must use"):
        AnswerVocabulary.from_samples(train + test_set)
    with pytest.raises(ConfigError):
        AnswerVocabulary.from_samples(train, splits=("train", "test"))
    with pytest.raises(DataError, match="split 'val'"):
        AnswerVocabulary.from_samples(train, splits=("train",))


def test_coverage(train, test_set):
    vocab = AnswerVocabulary.from_samples(train)
    # answers no, yes, ct are known; "no" (p4) known; "2 cm" is not
    assert coverage(vocab, test_set) == pytest.approx(4 / 5)
    assert math.isnan(coverage(vocab, []))
