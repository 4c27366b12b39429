"""SLAKE 1.0 (Liu et al., ISBI 2021): bilingual questions, and its bounding-box annotations.

Local layout: ``<root>/slake/train.json``, ``validate.json``, ``test.json`` and
``imgs/xmlabN/source.jpg`` (+ ``detection.json``). Splits are ``train``/``val``/``test``
(``"validate"`` is accepted for ``val``). Fields are mapped as follows:

* ``question_type`` from ``content_type`` (``KG`` → ``"knowledge"``, the rest by name);
* ``organ`` is SLAKE's ``location`` lower-cased (``"abdomen"``, ``"lung"``,
  ``"brain_tissue"``, ...), the original in ``extra["location"]``;
* ``modality`` lower-cased (``"ct"``, ``"x-ray"``, ``"mri"``); ``base_type``, ``triple``,
  ``q_lang`` in ``extra``; answers are strings, stripped and lower-cased
  (``extra["raw_answer"]`` keeps the original).

Within one language the splits share no images, but across languages they do. Whenever
Chinese questions are loaded for ``train``/``val`` (``lang="zh"`` or ``"all"``), every loaded
question whose image occurs anywhere in the test split (either language) is dropped, so nothing
trains on a question about a test image. :func:`slake_report` gives the counts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medvqa_lib.data.question_types import normalize_answer_type, slake_question_type
from medvqa_lib.data.registry import (
    dataset_folder,
    normalize_split,
    read_json_list,
    require_fields,
)
from medvqa_lib.data.registry import verify_images as _verify_images
from medvqa_lib.data.schema import SPLITS, LabelledImage, VQASample
from medvqa_lib.errors import DataError, unknown_name

log = logging.getLogger(__name__)

FOLDER = "slake"
FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}
HUB_FILES = {"train": "train.json", "val": "validation.json", "test": "test.json"}
LAYOUT = ("<root>/slake/train.json, <root>/slake/validate.json, <root>/slake/test.json, "
          "<root>/slake/imgs/xmlabN/source.jpg")
REQUIRED = ("img_name", "question", "answer", "q_lang", "location", "modality", "answer_type",
            "content_type", "qid")
LANGS = ("en", "zh", "all")
HUB_ID = "BoKelvin/SLAKE"

#: detection labels that name a finding; every other label names an organ or structure
DISEASE_LABELS: frozenset[str] = frozenset({
    "Atelectasis", "Brain Edema", "Brain Enhancing Tumor", "Brain Non-enhancing Tumor",
    "Cardiomegaly", "Effusion", "Infiltrate", "Liver Cancer", "Lung Cancer", "Mass", "Nodule",
    "Pneumonia", "Pneumothorax",
})


def _image_id(img_name: str) -> str:
    return Path(img_name).parent.name or Path(img_name).stem


def record_to_sample(record: dict[str, Any], split: str, imgs: Path,
                     dataset: str = "slake") -> VQASample:
    """One SLAKE record as a :class:`VQASample` (see module docstring)."""
    img_name = str(record["img_name"]).strip()
    location = str(record["location"]).strip()
    raw_answer = record["answer"]
    return VQASample(
        qid=str(record["qid"]),
        image_id=_image_id(img_name),
        image=imgs / img_name,
        question=str(record["question"]).strip(),
        answer=str(raw_answer).strip().lower(),
        answer_type=normalize_answer_type(record["answer_type"]),
        question_type=slake_question_type(record["content_type"]),
        organ=location.lower() or "unknown",
        split=split,
        dataset=dataset,
        modality=str(record["modality"]).strip().lower() or "unknown",
        extra={
            "raw_answer": raw_answer,
            "location": location,
            "q_lang": str(record["q_lang"]).strip(),
            "base_type": record.get("base_type"),
            "triple": record.get("triple"),
            "content_type": record["content_type"],
            "img_name": img_name,
        },
    )


def _read(path: Path, split: str, imgs: Path, dataset: str) -> list[VQASample]:
    records = read_json_list(path, LAYOUT)
    for i, record in enumerate(records):
        require_fields(record, REQUIRED, path, i)
    return [record_to_sample(r, split, imgs, dataset) for r in records]


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise unknown_name("SLAKE language", lang, LANGS)


def _in_lang(sample: VQASample, lang: str) -> bool:
    return lang == "all" or sample.extra["q_lang"] == lang


def slake_split(
    files: dict[str, Path], imgs: Path, split: str, lang: str, dataset: str = "slake"
) -> tuple[list[VQASample], int]:
    """``(samples, dropped)`` for one split read from ``files`` (split → JSON path).

    ``dropped`` counts questions left out because their image occurs in the test split.
    """
    _check_lang(lang)
    samples = [s for s in _read(files[split], split, imgs, dataset) if _in_lang(s, lang)]
    if split == "test" or lang == "en":
        return samples, 0
    test_images = {s.image_id for s in _read(files["test"], "test", imgs, dataset)}
    kept = [s for s in samples if s.image_id not in test_images]
    return kept, len(samples) - len(kept)


def _local(root: str | os.PathLike | None) -> tuple[dict[str, Path], Path]:
    folder = dataset_folder(root, FOLDER, LAYOUT)
    return {split: folder / name for split, name in FILES.items()}, folder / "imgs"


def load_slake(
    split: str,
    root: str | os.PathLike | None = None,
    *,
    lang: str = "en",
    verify_images: bool = False,
) -> list[VQASample]:
    """The ``train``/``val``/``test`` questions of the local SLAKE copy in ``lang``.

    ``lang`` is ``"en"`` (the usual benchmark), ``"zh"`` or ``"all"``. With Chinese questions
    in train/val, questions about test images are dropped (see module docstring).
    ``verify_images=True`` raises :class:`DataError` if image files are missing.
    """
    split = normalize_split(split)
    _check_lang(lang)
    files, imgs = _local(root)
    samples, dropped = slake_split(files, imgs, split, lang)
    if dropped:
        log.info("SLAKE %s (%s): dropped %d questions about test images", split, lang, dropped)
    if verify_images:
        _verify_images(samples, "SLAKE")
    return samples


def slake_report(root: str | os.PathLike | None = None, *, lang: str = "all") -> dict[str, Any]:
    """Per split: questions kept, questions dropped for test images, distinct images."""
    files, imgs = _local(root)
    report: dict[str, Any] = {"lang": lang}
    for split in SPLITS:
        samples, dropped = slake_split(files, imgs, split, lang)
        report[split] = len(samples)
        report[f"{split}_dropped_test_images"] = dropped
        report[f"{split}_images"] = len({s.image_id for s in samples})
    return report


# ----------------------------------------------------------------------------- detection


def read_detection(path: Path) -> tuple[list[str], list[list[float]]]:
    """``(labels, boxes)`` from one ``detection.json`` (boxes as ``[x, y, w, h]``)."""
    layout = "<root>/slake/imgs/xmlabN/detection.json: a list of {label: [x, y, w, h]}"
    labels, boxes = [], []
    for i, entry in enumerate(read_json_list(path, layout, allow_empty=True)):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is not a {{label: [x, y, w, h]}} object")
        for label, box in entry.items():
            if not (isinstance(box, list) and len(box) == 4
                    and all(isinstance(v, (int, float)) for v in box)):
                raise DataError(f"{path}: entry {i} ({label!r}) is not a box [x, y, w, h]")
            labels.append(str(label))
            boxes.append([float(v) for v in box])
    return labels, boxes


def _unique(items: list[str], keep: Callable[[str], bool]) -> list[str]:
    return list(dict.fromkeys(x for x in items if keep(x)))


def _split_images(files: dict[str, Path], imgs: Path, split: str) -> dict[str, VQASample]:
    """First English question per image of ``split``, keyed by image id (file order)."""
    first: dict[str, VQASample] = {}
    for sample in _read(files[split], split, imgs, "slake"):
        if sample.extra["q_lang"] == "en":
            first.setdefault(sample.image_id, sample)
    return first


def load_slake_detection(
    split: str = "train", root: str | os.PathLike | None = None
) -> list[LabelledImage]:
    """SLAKE's own box annotations for the images of one (English) split.

    Each :class:`LabelledImage` has attributes ``modality``, ``organ`` (the location,
    lower-cased), ``location``, ``labels`` and ``boxes`` (``[x, y, w, h]``, same order),
    ``organs`` and ``diseases`` (distinct labels, split by :data:`DISEASE_LABELS`). Only the
    chosen split's images are returned: test images only when ``split="test"``.
    """
    split = normalize_split(split)
    files, imgs = _local(root)
    out = []
    for image_id, sample in _split_images(files, imgs, split).items():
        folder = Path(sample.image).parent
        labels, boxes = read_detection(folder / "detection.json")
        out.append(LabelledImage(
            image_id=image_id,
            image=sample.image,
            attributes={
                "modality": sample.modality,
                "organ": sample.organ,
                "location": sample.extra["location"],
                "labels": labels,
                "boxes": boxes,
                "organs": _unique(labels, lambda x: x not in DISEASE_LABELS),
                "diseases": _unique(labels, lambda x: x in DISEASE_LABELS),
            },
            split=split,
            dataset="slake",
        ))
    return out


# ----------------------------------------------------------------------------- hub


def _hub_imgs_folder(extracted: Path) -> Path:
    """The folder that holds the ``xmlabN`` folders inside the extracted archive."""
    if any(extracted.glob("xmlab*")):
        return extracted
    for candidate in sorted(extracted.rglob("xmlab*")):
        if candidate.is_dir():
            return candidate.parent
    raise DataError(f"no xmlabN image folders found in {extracted}; delete it and retry")


def load_slake_hub(split: str, *, lang: str = "en") -> list[VQASample]:
    """SLAKE from the authors' Hub copy ``BoKelvin/SLAKE`` (same JSON files as the release).

    The questions (``train.json``, ``validation.json``, ``test.json``) and ``imgs.zip`` are
    downloaded into the Hugging Face cache and the images extracted once under
    ``$MEDVQA_CACHE_DIR`` (default ``~/.cache/medvqa_lib``). Fields, languages and the
    test-image rule are as in :func:`load_slake`.
    """
    from medvqa_lib.data.hub import extract_zip_once, hub_file, medvqa_cache_dir

    split = normalize_split(split)
    _check_lang(lang)
    files = {s: hub_file(HUB_ID, name) for s, name in HUB_FILES.items()}
    archive = hub_file(HUB_ID, "imgs.zip")
    extracted = extract_zip_once(archive, medvqa_cache_dir() / "slake-hub-imgs")
    samples, dropped = slake_split(files, _hub_imgs_folder(extracted), split, lang, "slake-hub")
    if dropped:
        log.info("SLAKE hub %s (%s): dropped %d questions about test images", split, lang, dropped)
    return samples
