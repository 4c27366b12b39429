"""Split guards: nothing is selected, fitted or tuned on test data."""

from __future__ import annotations

import pytest

from medvqa_lib.data.schema import VQASample
from medvqa_lib.errors import ConfigError, DataError
from medvqa_lib.evaluation.guards import ensure_splits, split_counts


def make(i: int, split: str) -> VQASample:
    return VQASample(
        qid=f"q{i}",
        image_id="img",
        image=None,
        question="is there a mass",
        answer="yes",
        answer_type="closed",
        question_type="presence",
        split=split,
    )


def test_message_text():
    samples = [make(i, "test") for i in range(451)]
    with pytest.raises(DataError) as info:
        ensure_splits(samples, {"val"}, "model selection")
    assert str(info.value) == (
        "model selection must use validation data only; got 451 samples from split 'test'"
    )


def test_several_bad_splits_and_singular():
    samples = [make(0, "val"), make(1, "test"), make(2, "test"), make(3, "train")]
    with pytest.raises(DataError) as info:
        ensure_splits(samples, {"train"}, "fitting the prior")
    assert str(info.value) == (
        "fitting the prior must use training data only; "
        "got 1 sample from split 'val' and 2 samples from split 'test'"
    )


def test_two_allowed_splits_named():
    with pytest.raises(DataError, match="must use training or validation data only"):
        ensure_splits([make(0, "test")], {"val", "train"}, "building the vocabulary")


def test_allowed_passes():
    samples = [make(0, "train"), make(1, "val")]
    assert ensure_splits(samples, {"train", "val"}, "fitting") is None
    assert ensure_splits([], {"val"}, "model selection") is None
    assert ensure_splits([make(0, "val")], "val", "model selection") is None


def test_records_and_counts():
    records = [{"split": "train"}, {"split": "test"}, {"split": "test"}]
    assert split_counts(records) == {"train": 1, "test": 2}
    with pytest.raises(DataError, match="got 2 samples from split 'test'"):
        ensure_splits(records, {"train"}, "fitting")


def test_bad_input():
    with pytest.raises(DataError, match="no 'split'"):
        ensure_splits([object()], {"train"}, "fitting")
    with pytest.raises(ConfigError):
        ensure_splits([make(0, "train")], set(), "fitting")
