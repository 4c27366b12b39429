"""VQA-RAD (Lau et al., 2018) in the MEVF train/test split, plus its Hugging Face Hub copy.

Local layout: ``<root>/vqa_rad/trainset.json``, ``testset.json`` and ``images/``. The release
is normalised as follows (originals kept in ``extra``):

* answers: integers become strings; answers are stripped and lower-cased
  (``extra["raw_answer"]`` keeps the original);
* ``answer_type``: ``"CLOSED "`` (trailing space) and ``"CLOSED"`` → ``"closed"``;
* ``question_type``: codes are mapped onto the shared vocabulary; a combination such as
  ``"PRES, POS"`` takes the type of its first code, and ``extra["question_types"]`` lists all
  (``extra["raw_question_type"]`` keeps the code as written);
* ``organ``: ``CHEST``/``ABD``/``HEAD`` → ``"chest"``/``"abdomen"``/``"head"``.

There is no official validation split. The test split is by question (every test image also
occurs in train), so ``val`` is carved out of train the same way: by question, with a fixed
seed. Repeated questions (same image, same question) stay together on one side. Train rows
that repeat a test question (same image and question) are dropped from train and val by
default, so nothing trains on a test question; :func:`vqa_rad_report` gives the counts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from medvqa_lib.data.question_types import (
    normalize_answer_type,
    vqa_rad_question_type,
    vqa_rad_question_types,
)
from medvqa_lib.data.registry import (
    carve_validation,
    dataset_folder,
    drop_repeats,
    normalize_split,
    question_key,
    read_json_list,
    require_fields,
)
from medvqa_lib.data.registry import verify_images as _verify_images
from medvqa_lib.data.schema import VQASample
from medvqa_lib.errors import DataError, unknown_name

log = logging.getLogger(__name__)

FOLDER = "vqa_rad"
FILES = {"train": "trainset.json", "test": "testset.json"}
LAYOUT = "<root>/vqa_rad/trainset.json, <root>/vqa_rad/testset.json, <root>/vqa_rad/images/"
REQUIRED = ("qid", "image_name", "image_organ", "answer", "answer_type", "question_type",
            "question", "phrase_type")
ORGANS = {"chest": "chest", "abd": "abdomen", "head": "head"}
HUB_ID = "flaviagiammarino/vqa-rad"
#: the two test sets papers report: free-form questions only, or all of them
SUBSETS = ("free", "free+para")


def _organ(raw: Any) -> str:
    name = str(raw).strip().lower()
    return ORGANS.get(name, name or "unknown")


def record_to_sample(record: dict[str, Any], split: str, images: Path) -> VQASample:
    """One MEVF-style VQA-RAD record as a :class:`VQASample` (see module docstring)."""
    raw_answer = record["answer"]
    raw_type = record["question_type"]
    image_name = str(record["image_name"]).strip()
    return VQASample(
        qid=str(record["qid"]),
        image_id=Path(image_name).stem,
        image=images / image_name,
        question=str(record["question"]).strip(),
        answer=str(raw_answer).strip().lower(),
        answer_type=normalize_answer_type(record["answer_type"]),
        question_type=vqa_rad_question_type(raw_type),
        organ=_organ(record["image_organ"]),
        split=split,
        dataset="vqa-rad",
        extra={
            "raw_answer": raw_answer,
            "phrase_type": str(record["phrase_type"]).strip().lower(),
            "raw_question_type": raw_type,
            "question_types": vqa_rad_question_types(raw_type),
            "image_name": image_name,
        },
    )


def _read(folder: Path, split: str) -> list[VQASample]:
    path = folder / FILES[split]
    records = read_json_list(path, LAYOUT)
    for i, record in enumerate(records):
        require_fields(record, REQUIRED, path, i)
    return [record_to_sample(r, split, folder / "images") for r in records]


def _key(sample: VQASample) -> tuple[str, str]:
    return question_key(sample.image_id, sample.question)


def _build(
    root: str | os.PathLike | None, val_fraction: float, seed: int, drop_test_duplicates: bool
) -> tuple[dict[str, list[VQASample]], dict[str, Any]]:
    folder = dataset_folder(root, FOLDER, LAYOUT)
    train_all, test = _read(folder, "train"), _read(folder, "test")
    test_keys = {_key(s) for s in test}
    repeats = sum(_key(s) in test_keys for s in train_all)
    train = train_all
    if drop_test_duplicates:
        train, _ = drop_repeats(train_all, test_keys, _key)
    train, val = carve_validation(train, _key, val_fraction, seed)
    val = [replace(s, split="val") for s in val]
    report = {
        "train_file_rows": len(train_all),
        "test_repeats_in_train": repeats,
        "dropped_test_repeats": len(train_all) - len(train) - len(val),
        "train": len(train),
        "val": len(val),
        "test": len(test),
        "val_fraction": val_fraction,
        "seed": seed,
    }
    return {"train": train, "val": val, "test": test}, report


def load_vqa_rad(
    split: str,
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    drop_test_duplicates: bool = True,
    verify_images: bool = False,
) -> list[VQASample]:
    """The ``train``/``val``/``test`` questions of the local VQA-RAD copy.

    ``root`` is the data folder (holding ``vqa_rad/``). ``val`` is ``val_fraction`` of
    the training questions, chosen by question with ``seed``. With ``drop_test_duplicates``,
    training rows that repeat a test (image, question) pair are left out of train and val.
    ``verify_images=True`` raises :class:`DataError` if image files are missing.
    """
    split = normalize_split(split)
    splits, report = _build(root, val_fraction, seed, drop_test_duplicates)
    if split != "test" and report["dropped_test_repeats"]:
        log.info("VQA-RAD: dropped %d training rows that repeat a test question",
                 report["dropped_test_repeats"])
    samples = splits[split]
    if verify_images:
        _verify_images(samples, "VQA-RAD")
    return samples


def vqa_rad_report(
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    drop_test_duplicates: bool = True,
) -> dict[str, Any]:
    """Counts behind :func:`load_vqa_rad`: rows per split and test repeats dropped."""
    splits, report = _build(root, val_fraction, seed, drop_test_duplicates)
    test = splits["test"]
    report["test_closed"] = sum(s.answer_type == "closed" for s in test)
    report["test_free"] = len(vqa_rad_subset(test, "free"))
    return report


def vqa_rad_subset(samples: list[VQASample], subset: str) -> list[VQASample]:
    """``"free"``: the free-form questions only; ``"free+para"``: all of them.

    Needs ``extra["phrase_type"]``, which only the local copy has.
    """
    if subset not in SUBSETS:
        raise unknown_name("VQA-RAD subset", subset, SUBSETS)
    if subset == "free+para":
        return list(samples)
    if any("phrase_type" not in s.extra for s in samples):
        raise DataError("the 'free' subset needs phrase_type, which only the local VQA-RAD "
                        "copy (trainset.json/testset.json) has; the Hub copy lacks it")
    return [s for s in samples if s.extra["phrase_type"] == "freeform"]


def load_vqa_rad_hub(
    split: str, *, val_fraction: float = 0.1, seed: int = 0, drop_test_duplicates: bool = True
) -> list[VQASample]:
    """VQA-RAD from the Hub copy ``flaviagiammarino/vqa-rad`` (train 1,793 / test 451).

    That copy has only ``image``, ``question``, ``answer``: ``answer_type`` is inferred
    (``"closed"`` for yes/no answers, else ``"open"`` — VQA-RAD's few closed non-yes/no
    questions count as open), ``question_type`` is ``"other"`` and there is no organ or
    phrase type. ``val`` is carved out of train as in :func:`load_vqa_rad`.
    """
    from medvqa_lib.data.hub import load_hub_vqa

    return load_hub_vqa(HUB_ID, split, dataset="vqa-rad-hub", val_fraction=val_fraction,
                        seed=seed, drop_test_duplicates=drop_test_duplicates)
