"""The shuffled-image control: every question moves to another image, and the comparison."""

import pandas as pd
import pytest

from medvqa_lib.data.schema import VQASample
from medvqa_lib.experiments.runs import RunRecord, shuffled_images
from medvqa_lib.experiments.tables import image_reliance


def _sample(i: int, image: str, answer_type: str = "closed") -> VQASample:
    return VQASample(qid=f"q{i}", image_id=image, image=f"/img/{image}.png", question=f"question {i}?",
                     answer="yes", answer_type=answer_type, question_type="presence")


def test_every_question_gets_another_image_and_images_stay_whole():
    samples = [_sample(i, f"im{i % 5}") for i in range(20)]
    moved = shuffled_images(samples, seed=3)
    assert [s.qid for s in moved] == [s.qid for s in samples]
    assert all(a.image_id != b.image_id for a, b in zip(samples, moved, strict=True))
    # an image id still points at that image's own file
    assert all(s.image == f"/img/{s.image_id}.png" for s in moved)
    # questions of one image move together, and every image is still used
    target = {}
    for a, b in zip(samples, moved, strict=True):
        assert target.setdefault(a.image_id, b.image_id) == b.image_id
    assert sorted(target.values()) == sorted(target)
    assert shuffled_images(samples, seed=3) == moved


def test_one_image_cannot_be_shuffled():
    with pytest.raises(ValueError, match="at least two distinct images"):
        shuffled_images([_sample(0, "a"), _sample(1, "a")])


def _scored(exact: list[float], types: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"qid": [f"q{i}" for i in range(len(exact))], "exact": exact,
                         "recall": exact, "answer_type": types})


def test_image_reliance_compares_own_and_other_image_per_answer_type():
    types = ["closed"] * 4 + ["open"] * 4
    rec = RunRecord("m", "d", 0, _scored([1, 1, 1, 0, 1, 0, 0, 0], types), train=None,
                    shuffled=_scored([1, 0, 0, 0, 1, 0, 0, 0], types))
    table = image_reliance([rec], n_resamples=200)
    assert table.loc[("d", "closed"), "own image (%)"] == 75.0
    assert table.loc[("d", "closed"), "another image (%)"] == 25.0
    assert table.loc[("d", "closed"), "difference (pp)"] == 50.0
    assert table.loc[("d", "open"), "difference (pp)"] == 0.0
    assert not table.loc[("d", "open"), "uses the image"]


def test_image_reliance_needs_the_control_runs():
    rec = RunRecord("m", "d", 0, _scored([1], ["closed"]), train=None)
    with pytest.raises(ValueError, match="image_control=True"):
        image_reliance([rec])
