"""The synthetic radiology generator: determinism, splits, answers that match the images."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from medvqa_lib.data import synthetic as syn
from medvqa_lib.data.schema import QUESTION_TYPES, SPLITS
from medvqa_lib.errors import ConfigError, UnknownNameError

SMALL = syn.SyntheticConfig(n_images=60, n_labelled=24, image_size=64, seed=3)


@pytest.fixture(scope="module")
def data() -> syn.SyntheticData:
    return syn.generate(SMALL)


@pytest.fixture(scope="module")
def many_questions() -> list[tuple[dict, syn.Draft]]:
    """Questions for 2500 images without drawing them (attributes only)."""
    out = []
    for i in range(2500):
        attrs = syn.sample_attributes(i, seed=1)
        for d in syn.make_questions(attrs, np.random.default_rng([1, i, 2]), 6):
            out.append((attrs, d))
    return out


def _pixels(samples) -> dict[str, bytes]:
    return {s.image_id: s.image.tobytes() for s in samples}


# ----------------------------------------------------------------------------- determinism


def test_same_config_gives_identical_images_and_samples(data):
    again = syn.generate(SMALL)
    assert _pixels(again.vqa) == _pixels(data.vqa)
    assert _pixels(again.labelled) == _pixels(data.labelled)
    assert [s.to_record() for s in again.vqa] == [s.to_record() for s in data.vqa]
    assert [c.caption for c in again.captions] == [c.caption for c in data.captions]


def test_other_seed_gives_other_images(data):
    other = syn.generate(syn.SyntheticConfig(n_images=60, n_labelled=0, image_size=64, seed=4))
    a, b = _pixels(data.vqa), _pixels(other.vqa)
    assert sum(a[k] != b[k] for k in a) == len(a)


def test_image_does_not_depend_on_n_images(data):
    small = syn.generate(syn.SyntheticConfig(n_images=12, n_labelled=0, image_size=64, seed=3))
    big = _pixels(data.vqa)
    for image_id, pixels in _pixels(small.vqa).items():
        assert big[image_id] == pixels
        assert small.attributes[image_id]["lesions"] == data.attributes[image_id]["lesions"]


def test_images_are_grayscale_of_the_requested_size(data):
    for s in data.vqa[:50] + data.labelled:
        image = s.image
        assert isinstance(image, Image.Image)
        assert image.mode == "L" and image.size == (64, 64)
    assert np.asarray(data.vqa[0].image).std() > 10  # not blank
    assert data.vqa[0].load_image().mode == "RGB"


def test_render_image_needs_only_scene_and_modality():
    for scene, spec in syn.SCENE_SPECS.items():
        image = syn.render_image(
            {"scene": scene, "modality": spec.modality}, 40, np.random.default_rng(0)
        )
        assert image.mode == "L" and image.size == (40, 40)
    with pytest.raises(UnknownNameError, match="ct_chest"):
        syn.render_image({"scene": "pet_scan", "modality": "pet"}, 40, np.random.default_rng(0))


# ----------------------------------------------------------------------------- splits and ids


def test_splits_are_disjoint_by_image_with_the_requested_proportions():
    cfg = syn.SyntheticConfig(n_images=200)
    splits = collections.Counter(
        syn.split_of(i, 0, cfg.val_fraction, cfg.test_fraction) for i in range(cfg.n_images)
    )
    assert abs(splits["train"] - 140) <= 4 and abs(splits["val"] - 20) <= 4
    assert abs(splits["test"] - 40) <= 4


def test_every_image_has_one_split(data):
    by_image = collections.defaultdict(set)
    for s in data.vqa:
        by_image[s.image_id].add(s.split)
        assert s.split == data.attributes[s.image_id]["split"]
    assert all(len(v) == 1 for v in by_image.values())
    assert {next(iter(v)) for v in by_image.values()} == set(SPLITS)


def test_sample_fields(data):
    qids = [s.qid for s in data.vqa]
    assert len(set(qids)) == len(qids)
    assert len(data.vqa) == SMALL.n_images * SMALL.questions_per_image
    for s in data.vqa:
        assert s.qid.startswith(s.image_id + "-q") and s.image_id.startswith("syn-")
        assert s.dataset == "synthetic" and s.answer_type in ("closed", "open")
        assert s.question_type in QUESTION_TYPES
        assert s.organ in ("chest", "abdomen", "head")
        assert s.modality == data.attributes[s.image_id]["modality"]
        assert s.answer == s.answer.lower().strip() and s.answer
        assert s.question.endswith("?")


def test_loaders_are_cached_and_split():
    first = syn.load_synthetic_vqa("val", n_images=30, image_size=32, seed=5)
    second = syn.load_synthetic_vqa("val", n_images=30, image_size=32, seed=5)
    assert first and all(a.image is b.image for a, b in zip(first, second, strict=True))
    assert {s.split for s in first} == {"val"}
    test = syn.load_synthetic_vqa("test", n_images=30, image_size=32, seed=5)
    assert not {s.image_id for s in test} & {s.image_id for s in first}


# ----------------------------------------------------------------------------- answers


def test_answers_match_the_attributes(data):
    for s in data.vqa:
        a = data.attributes[s.image_id]
        template = s.extra["template"]
        if template == "count_open":
            assert s.answer == str(a["count"]) == str(len(a["lesions"]))
        elif template in ("modality_open", "modality_choice"):
            assert s.answer == a["modality"]
        elif template in ("plane_open", "plane_choice"):
            assert s.answer == a["plane"]
        elif template == "body_part_open":
            assert s.answer == a["body_part"]
        elif template == "position_open":
            assert s.answer == a["location"]
        elif template in ("size_open", "size_choice"):
            assert s.answer == a["size"]
        elif template == "abnormality_open":
            assert s.answer == (a["abnormality"] or "none")
        elif template == "abnormal_yesno":
            inverted = "normal?" in s.question.replace("abnormal?", "") or "healthy" in s.question
            assert (s.answer == "yes") == (a["abnormal"] != inverted)


def test_yes_no_questions_name_what_they_ask_about(many_questions):
    for a, d in many_questions:
        if d.template == "modality_yesno":
            asked = next(m for m, name in syn.MOD.items() if f" {name} " in f" {d.question[:-1]} ")
            assert (d.answer == "yes") == (asked == a["modality"])
        elif d.template == "count_yesno":
            asked = next(
                n
                for n, word in syn.NUM.items()
                if f" {word} " in d.question or d.question.endswith(f" {n}?")
            )
            assert (d.answer == "yes") == (asked == a["count"])
        elif d.template == "organ_yesno":
            asked = next(o for o, np_ in syn.ORGAN_NP.items() if np_ in d.question)
            assert (d.answer == "yes") == (asked in a["organs"])


def test_patient_left_is_image_right():
    for i in range(300):
        a = syn.sample_attributes(i)
        for les in a["lesions"]:
            if les["side"] == "left":
                assert les["x"] > 0.5, a["image_id"]
            elif les["side"] == "right":
                assert les["x"] < 0.5, a["image_id"]
        if a["location"] and a["location"].split()[0] in ("left", "right"):
            assert {les["side"] for les in a["lesions"]} == {a["location"].split()[0]}


def test_lesions_do_not_overlap():
    for i in range(300):
        lesions = syn.sample_attributes(i)["lesions"]
        for j, p in enumerate(lesions):
            for q in lesions[j + 1 :]:
                assert np.hypot(p["x"] - q["x"], p["y"] - q["y"]) > p["r"] + q["r"]


def test_closed_answers_are_balanced_per_template(many_questions):
    counts = collections.defaultdict(collections.Counter)
    for _, d in many_questions:
        if d.answer in ("yes", "no"):
            counts[d.template][d.answer] += 1
    assert len(counts) >= 8
    for template, c in counts.items():
        share = c["yes"] / (c["yes"] + c["no"])
        assert 0.35 <= share <= 0.65, (template, share)


def test_open_answers_are_spread(many_questions):
    answers = collections.defaultdict(collections.Counter)
    for _, d in many_questions:
        if d.answer_type == "open":
            answers[d.question_type][d.answer] += 1
    for qtype, c in answers.items():
        assert len(c) >= 2 and max(c.values()) / sum(c.values()) < 0.6, (qtype, c)


def test_question_only_prior_is_far_from_perfect(data):
    train = [s for s in data.vqa if s.split == "train"]
    test = [s for s in data.vqa if s.split != "train"]
    majority = {}
    for qtype in {s.question_type for s in train}:
        c = collections.Counter(s.answer for s in train if s.question_type == qtype)
        majority[qtype] = c.most_common(1)[0][0]
    acc = np.mean([majority.get(s.question_type) == s.answer for s in test])
    assert acc < 0.55
    types = {s.question_type for s in data.vqa}
    assert {
        "modality",
        "plane",
        "organ",
        "abnormality",
        "presence",
        "position",
        "size",
        "quantity",
    } <= types


# ----------------------------------------------------------------------------- captions, labels


def test_captions_come_from_train_images_only(data):
    train_ids = {s.image_id for s in data.vqa if s.split == "train"}
    assert {c.image_id for c in data.captions} == train_ids
    for c in data.captions:
        assert c.split == "train" and c.caption.endswith(".") and len(c.caption.split()) >= 4
        assert c.image.mode == "L"
    every = syn.load_synthetic_captions(
        n_images=30, image_size=32, seed=5, splits=("train", "val", "test")
    )
    assert {c.split for c in every} == set(SPLITS)
    assert {c.split for c in syn.load_synthetic_captions(n_images=30, image_size=32, seed=5)} == {
        "train"
    }


def test_caption_mentions_modality_and_finding(data):
    for c in data.captions:
        a = data.attributes[c.image_id]
        text = c.caption.lower()
        assert {"ct": "ct", "mri": "mri", "x-ray": "x-ray"}[a["modality"]] in text
        if a["lesions"]:
            assert a["location"] in text and a["size"] in text


def test_labelled_pool_is_separate_with_valid_boxes(data):
    vqa_ids = {s.image_id for s in data.vqa}
    assert len(data.labelled) == SMALL.n_labelled
    assert not vqa_ids & {x.image_id for x in data.labelled}
    size = SMALL.image_size
    for x in data.labelled:
        lab = x.attributes
        assert x.image_id.startswith("synlab-") and lab["modality"] == "x-ray"
        assert lab["class"] in syn.LABEL_CLASSES
        assert lab["target"] == int(lab["class"] == "Lung Opacity")
        assert lab["n_opacities"] == len(lab["boxes"]) == len(lab["locations"])
        assert (lab["n_opacities"] > 0) == (lab["target"] == 1)
        for bx, by, bw, bh in lab["boxes"]:
            assert 0 <= bx and 0 <= by and bw > 0 and bh > 0
            assert bx + bw <= size and by + bh <= size
        for loc in lab["locations"]:
            side, zone, organ = loc.split()
            assert side in ("left", "right") and zone in ("upper", "lower") and organ == "lung"


def test_labelled_loader():
    labelled = syn.load_synthetic_labelled(n_labelled=9, image_size=32, seed=2)
    assert len(labelled) == 9 and labelled[0].image.size == (32, 32)
    assert (
        labelled[0].image
        is syn.load_synthetic_labelled(n_labelled=9, image_size=32, seed=2)[0].image
    )


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_images": 5}, "n_images"),
        ({"image_size": 16}, "image_size"),
        ({"n_labelled": -1}, "n_labelled"),
        ({"questions_per_image": 0}, "questions_per_image"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        syn.SyntheticConfig(**kwargs)


def test_unknown_split_lists_the_choices():
    with pytest.raises(UnknownNameError) as err:
        syn.load_synthetic_vqa("dev", n_images=10)
    assert "'dev'" in str(err.value) and all(s in str(err.value) for s in SPLITS)
