"""Answer normalisation: a table of hand-checked cases."""

from __future__ import annotations

import doctest

import pytest

from medvqa_lib.evaluation import normalize
from medvqa_lib.evaluation.normalize import normalize_answer, normalized_tokens

CASES = [
    # case, whitespace
    ("Yes", "yes"),
    ("  No  ", "no"),
    ("left   lung", "left lung"),
    ("CT", "ct"),
    # articles
    ("The liver", "liver"),
    ("a mass in the lung", "mass in lung"),
    ("An X-Ray", "xray"),
    ("theory", "theory"),
    # punctuation
    ("yes.", "yes"),
    ("Yes!", "yes"),
    ("left, right", "left right"),
    ("left-sided", "left sided"),
    ("T2-weighted", "t2 weighted"),
    ("(both)", "both"),
    ('"yes"', "yes"),
    ("e.g. lung", "eg lung"),
    # x-ray spellings
    ("X-Ray", "xray"),
    ("x ray", "xray"),
    ("XRAY", "xray"),
    ("chest x-ray", "chest xray"),
    ("X-rays", "xrays"),
    # numbers
    ("2.5", "2.5"),
    ("2.5 cm.", "2.5 cm"),
    (".5 mm", ".5 mm"),
    ("1,000", "1000"),
    ("50 %", "50%"),
    ("two", "2"),
    ("Zero", "0"),
    ("ten lesions", "10 lesions"),
    ("none", "none"),
    # contractions
    ("isnt", "isn't"),
    ("Isn't", "isn't"),
    ("don\u2019t know", "don't know"),
    # empty and non-string input
    ("", ""),
    ("the", ""),
    (3, "3"),
    (2.5, "2.5"),
    (None, ""),
    (float("nan"), ""),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_normalize_table(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("variant", ["x-ray", "X Ray", "xray", "X-RAY", "an x-ray."])
def test_xray_spellings_are_equal(variant):
    assert normalize_answer(variant) == normalize_answer("X-Ray") == "xray"


def test_ct_case_insensitive():
    assert normalize_answer("CT") == normalize_answer("ct") == normalize_answer("The CT.")


def test_idempotent():
    for text, _ in CASES:
        once = normalize_answer(text)
        assert normalize_answer(once) == once


def test_tokens():
    assert normalized_tokens("The left Lung.") == ["left", "lung"]
    assert normalized_tokens("") == []


def test_docstring_examples():
    result = doctest.testmod(normalize)
    assert result.attempted > 0
    assert result.failed == 0
