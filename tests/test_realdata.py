"""The loaders on the real VQA-RAD and SLAKE folders (counts from the data README).

Skipped unless ``MEDVQA_DATA_DIR`` points at a folder holding ``vqa_rad/`` and ``slake/``.
"""

from __future__ import annotations

from collections import Counter

import pytest

from medvqa_lib.data import (
    check_images,
    load_slake,
    load_slake_detection,
    load_vqa,
    slake_report,
    vqa_rad_report,
    vqa_rad_subset,
)
from medvqa_lib.data.registry import question_key
from medvqa_lib.data.schema import QUESTION_TYPES

pytestmark = pytest.mark.realdata


def _pairs(samples):
    return {question_key(s.image_id, s.question) for s in samples}


@pytest.fixture(scope="module")
def vqa_rad(real_data_root):
    return {split: load_vqa("vqa-rad", split, root=real_data_root)
            for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def slake_en(real_data_root):
    return {split: load_vqa("slake", split, root=real_data_root)
            for split in ("train", "val", "test")}


def test_vqa_rad_test_counts(vqa_rad):
    test = vqa_rad["test"]
    assert len(test) == 451 and len({s.image_id for s in test}) == 203
    assert Counter(s.answer_type for s in test) == {"closed": 272, "open": 179}
    assert len(vqa_rad_subset(test, "free")) == 308
    assert len(test) - len(vqa_rad_subset(test, "free")) == 143


def test_vqa_rad_train_val_and_dropped_repeats(real_data_root, vqa_rad):
    report = vqa_rad_report(real_data_root)
    assert report["train_file_rows"] == 3064 and report["dropped_test_repeats"] == 22
    assert len(vqa_rad["train"]) + len(vqa_rad["val"]) == 3064 - 22
    assert len(vqa_rad["val"]) == report["val"] > 0
    test_pairs = _pairs(vqa_rad["test"])
    assert not _pairs(vqa_rad["train"]) & test_pairs
    assert not _pairs(vqa_rad["val"]) & test_pairs
    assert not _pairs(vqa_rad["train"]) & _pairs(vqa_rad["val"])
    everything = vqa_rad["train"] + vqa_rad["val"] + vqa_rad["test"]
    int_answers = [s for s in everything if isinstance(s.extra["raw_answer"], int)]
    assert len(int_answers) == 10 and all(isinstance(s.answer, str) for s in int_answers)
    assert {s.organ for s in vqa_rad["test"]} == {"chest", "abdomen", "head"}
    assert {s.question_type for s in vqa_rad["train"]} <= set(QUESTION_TYPES)


def test_vqa_rad_images_exist(vqa_rad):
    samples = vqa_rad["train"] + vqa_rad["val"] + vqa_rad["test"]
    assert check_images(samples) == []
    for s in samples[::700]:
        assert s.load_image().mode == "RGB"


def test_slake_english_counts(slake_en):
    assert [len(slake_en[s]) for s in ("train", "val", "test")] == [4919, 1053, 1061]
    assert Counter(s.answer_type for s in slake_en["test"]) == {"closed": 416, "open": 645}
    assert Counter(s.answer_type for s in slake_en["train"])["closed"] == 1943
    assert len({s.image_id for s in slake_en["test"]}) == 96
    assert {s.modality for s in slake_en["train"]} == {"ct", "x-ray", "mri"}
    assert {s.question_type for s in slake_en["train"]} <= set(QUESTION_TYPES)
    assert "other" not in {s.question_type for s in slake_en["train"]}


def test_slake_splits_share_no_images(slake_en):
    images = {split: {s.image_id for s in samples} for split, samples in slake_en.items()}
    assert not images["train"] & images["val"]
    assert not images["train"] & images["test"]
    assert not images["val"] & images["test"]


def test_slake_images_exist(slake_en):
    samples = slake_en["train"] + slake_en["val"] + slake_en["test"]
    assert check_images(samples) == []
    for s in samples[::1500]:
        assert s.load_image().mode == "RGB"


def test_slake_chinese_questions_about_test_images_dropped(real_data_root):
    test_images = {s.image_id for s in load_slake("test", real_data_root, lang="all")}
    for lang in ("zh", "all"):
        for split in ("train", "val"):
            kept = load_slake(split, real_data_root, lang=lang)
            assert kept and not {s.image_id for s in kept} & test_images
    report = slake_report(real_data_root, lang="zh")
    assert report["train_dropped_test_images"] > 0
    assert report["train"] + report["train_dropped_test_images"] == 9835 - 4919


def test_slake_detection_uses_only_the_split_images(real_data_root, slake_en):
    train = load_slake_detection("train", real_data_root)
    assert len(train) == 450
    assert {x.image_id for x in train} == {s.image_id for s in slake_en["train"]}
    test_images = {s.image_id for s in slake_en["test"]}
    assert not {x.image_id for x in train} & test_images
    labels = Counter(label for x in train for label in x.attributes["labels"])
    assert labels["Liver"] > 0
    assert any(x.attributes["diseases"] for x in train)
    assert all(len(x.attributes["labels"]) == len(x.attributes["boxes"]) for x in train)
