"""The book's embedded default dataset: procedurally drawn "synthetic radiology".

Five scenes are drawn (see :mod:`medvqa_lib.data.synthetic_render`): axial chest CT,
axial abdominal CT, axial and coronal brain MRI (T1 or T2 weighted) and frontal chest
X-rays. Half of the images carry one finding (lung nodules, pneumonia-like opacities,
cardiomegaly, liver tumours, kidney cysts, brain tumours) with a known count, side and size.

Sides are the *patient's*: by the radiological convention the patient's left is on the
image right, so "left lung" lesions have ``x > 0.5`` in the attributes.

From the ground-truth attributes come SLAKE-style VQA pairs (:class:`VQASample`), captions
for pre-training (:class:`CaptionSample`) and a separate pool of chest X-rays with
RSNA-pneumonia-like labels (:class:`LabelledImage`). Every image ``i`` is drawn from its own
``numpy`` generator seeded with ``[seed, i, stream]``, so it does not depend on how many
images are generated nor in which order; splits come from a golden-ratio sequence over the
image index, so every prefix of the images is split in the requested proportions.

Questions follow SLAKE's content types (``modality``, ``plane``, ``organ``, ``abnormality``,
``presence``, ``position``, ``size``, ``quantity``), closed (``yes``/``no`` or "A or B") and
open, several phrasings each. Answers are lower case: ``ct``/``mri``/``x-ray``,
``axial``/``coronal``, ``t1``/``t2``, ``chest``/``abdomen``/``head``, organ names, finding
names (``none`` for a normal image), locations such as ``left lung`` or ``both kidneys``,
``small``/``large`` and digit counts. Yes/no answers are balanced per template, so the
question alone does not give the answer away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from medvqa_lib.data.schema import SPLITS, CaptionSample, LabelledImage, VQASample
from medvqa_lib.data.synthetic_findings import (  # noqa: F401 (re-exported)
    KINDS,
    LABEL_CLASSES,
    P_ABNORMAL,
    SCENE_SPECS,
    _labels,
    _plural,
    sample_attributes,
    sample_labelled_attributes,
)
from medvqa_lib.data.synthetic_questions import (  # noqa: F401 (re-exported)
    MOD,
    NUM,
    ORGAN_NP,
    TEMPLATES,
    Draft,
    _a,
    _pick,
    _word,
    make_questions,
)
from medvqa_lib.data.synthetic_render import SCENES, render_image
from medvqa_lib.errors import ConfigError, unknown_name

__all__ = [
    "SyntheticConfig",
    "SyntheticData",
    "generate",
    "load_synthetic_vqa",
    "load_synthetic_captions",
    "load_synthetic_labelled",
    "render_image",
    "sample_attributes",
    "sample_labelled_attributes",
    "make_questions",
    "make_caption",
    "split_of",
    "SCENES",
    "SCENE_SPECS",
    "KINDS",
    "TEMPLATES",
]

DATASET = "synthetic"
# random streams of one image: [seed, index, stream] (attributes: synthetic_findings)
_RENDER, _QUESTIONS, _CAPTION = 1, 2, 3
_LAB_RENDER = 11


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and seed of the synthetic dataset (validated on construction)."""

    n_images: int = 2000
    n_labelled: int = 500
    image_size: int = 128
    seed: int = 0
    questions_per_image: int = 6
    val_fraction: float = 0.1
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        _check_int("n_images", self.n_images, 10)
        _check_int("n_labelled", self.n_labelled, 0)
        _check_int("image_size", self.image_size, 32)
        _check_int("questions_per_image", self.questions_per_image, 1)
        _check_int("seed", self.seed, 0)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be in the open interval (0, 1), got {value!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                "val_fraction + test_fraction must be < 1 (the rest is train), got "
                f"{self.val_fraction} + {self.test_fraction}"
            )


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class SyntheticData:
    """Everything :func:`generate` makes from one config.

    ``attributes`` maps every image id (VQA and labelled pools) to its ground truth: scene,
    modality, plane, body part, organs, MRI weighting, finding, location, count, size,
    lesions (centre and radius as fractions of the side), anatomy layout and split.
    """

    config: SyntheticConfig
    vqa: list[VQASample]
    captions: list[CaptionSample]
    labelled: list[LabelledImage]
    attributes: dict[str, dict] = field(default_factory=dict)


# --------------------------------------------------------------------------- captions


def _finding_phrase(a: dict, rng) -> str:
    if not a["abnormal"]:
        return _pick(rng, ["no abnormality", "no visible lesion", "a normal appearance"])
    if a["abnormality"] == "cardiomegaly":
        return _pick(rng, ["an enlarged heart", "cardiomegaly"])
    w, n = _word(a, rng), a["count"]
    lesions = f"{_a(a['size'])} {w}" if n == 1 else f"{NUM[n]} {a['size']} {_plural(w)}"
    where = a["location"] if a["location"].startswith("both") else f"the {a['location']}"
    return f"{lesions} in {where}"


def make_caption(attrs: dict, rng: np.random.Generator) -> str:
    """One caption from a few templates, naming modality, plane, region and finding."""
    mod = {"mri": f"{(attrs['weighting'] or 't1').upper()}-weighted MRI"}.get(
        attrs["modality"], MOD[attrs["modality"]]
    )
    plane = "frontal" if attrs["modality"] == "x-ray" else attrs["plane"]
    part = {"head": "brain"}.get(attrs["body_part"], attrs["body_part"])
    finding = _finding_phrase(attrs, rng)
    template = _pick(
        rng,
        [
            "{P} {m} of the {b} showing {f}.",
            "{M} image of the {b}, {p} plane, with {f}.",
            "{B} {m} ({p}): {f}.",
        ],
    )
    text = template.format(
        P=plane.capitalize(), p=plane, m=mod, M=mod, b=part, B=part.capitalize(), f=finding
    )
    return text[0].upper() + text[1:]


# --------------------------------------------------------------------------- assembly


def split_of(
    index: int, seed: int, val_fraction: float, test_fraction: float, salt: int = 0
) -> str:
    """The split of image ``index``: a golden-ratio sequence keeps every prefix well balanced."""
    offset = np.random.default_rng([seed, salt, 99]).random()
    u = (index * 0.6180339887498949 + offset) % 1.0
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def _render(attrs: dict, size: int, seed: int, stream: int) -> Image.Image:
    return render_image(attrs, size, np.random.default_rng([seed, attrs["index"], stream]))


def _vqa_part(cfg: SyntheticConfig, caption_splits: tuple[str, ...]):
    vqa, captions, attributes = [], [], {}
    for i in range(cfg.n_images):
        attrs = sample_attributes(i, cfg.seed)
        attrs["split"] = split = split_of(i, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        image, image_id = _render(attrs, cfg.image_size, cfg.seed, _RENDER), attrs["image_id"]
        attributes[image_id] = attrs
        rng = np.random.default_rng([cfg.seed, i, _QUESTIONS])
        for j, d in enumerate(make_questions(attrs, rng, cfg.questions_per_image)):
            vqa.append(
                VQASample(
                    qid=f"{image_id}-q{j}",
                    image_id=image_id,
                    image=image,
                    question=d.question,
                    answer=d.answer,
                    answer_type=d.answer_type,
                    question_type=d.question_type,
                    organ=attrs["body_part"],
                    split=split,
                    dataset=DATASET,
                    modality=attrs["modality"],
                    extra={"template": d.template},
                )
            )
        if split in caption_splits:
            text = make_caption(attrs, np.random.default_rng([cfg.seed, i, _CAPTION]))
            captions.append(
                CaptionSample(
                    image_id, image, text, split, DATASET, {"modality": attrs["modality"]}
                )
            )
    return vqa, captions, attributes


def _labelled_part(cfg: SyntheticConfig) -> tuple[list[LabelledImage], dict[str, dict]]:
    out, attributes = [], {}
    for i in range(cfg.n_labelled):
        attrs = sample_labelled_attributes(i, cfg.seed)
        attrs["split"] = split_of(i, cfg.seed, cfg.val_fraction, cfg.test_fraction, salt=1)
        image = _render(attrs, cfg.image_size, cfg.seed, _LAB_RENDER)
        attributes[attrs["image_id"]] = attrs
        out.append(
            LabelledImage(
                attrs["image_id"], image, _labels(attrs, cfg.image_size), attrs["split"], DATASET
            )
        )
    return out, attributes


def generate(
    config: SyntheticConfig = SyntheticConfig(), *, caption_splits: tuple[str, ...] = ("train",)
) -> SyntheticData:
    """Draw the whole dataset for ``config`` (deterministic: same config, same bytes).

    Captions are made for the train images only unless ``caption_splits`` asks for more.
    """
    for s in caption_splits:
        if s not in SPLITS:
            raise unknown_name("split", s, SPLITS)
    vqa, captions, attributes = _vqa_part(config, tuple(caption_splits))
    labelled, lab_attributes = _labelled_part(config)
    return SyntheticData(config, vqa, captions, labelled, {**attributes, **lab_attributes})


@lru_cache(maxsize=4)
def _cached_vqa(cfg: SyntheticConfig):
    return _vqa_part(cfg, SPLITS)


@lru_cache(maxsize=4)
def _cached_labelled(cfg: SyntheticConfig) -> list[LabelledImage]:
    return _labelled_part(cfg)[0]


def load_synthetic_vqa(
    split: str, *, n_images: int = 2000, image_size: int = 128, seed: int = 0
) -> list[VQASample]:
    """The VQA samples of one split (cached: treat the returned samples as read-only)."""
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    cfg = SyntheticConfig(n_images=n_images, n_labelled=0, image_size=image_size, seed=seed)
    return [s for s in _cached_vqa(cfg)[0] if s.split == split]


def load_synthetic_captions(
    *,
    n_images: int = 2000,
    image_size: int = 128,
    seed: int = 0,
    splits: tuple[str, ...] = ("train",),
) -> list[CaptionSample]:
    """Image-caption pairs of the VQA images in ``splits`` (train only by default; cached)."""
    for s in splits:
        if s not in SPLITS:
            raise unknown_name("split", s, SPLITS)
    cfg = SyntheticConfig(n_images=n_images, n_labelled=0, image_size=image_size, seed=seed)
    return [c for c in _cached_vqa(cfg)[1] if c.split in splits]


def load_synthetic_labelled(
    *, n_labelled: int = 500, image_size: int = 128, seed: int = 0
) -> list[LabelledImage]:
    """Chest X-rays with RSNA-pneumonia-like labels, disjoint from the VQA images (cached)."""
    cfg = SyntheticConfig(n_images=10, n_labelled=n_labelled, image_size=image_size, seed=seed)
    return list(_cached_labelled(cfg))
