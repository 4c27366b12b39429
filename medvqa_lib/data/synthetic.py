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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from medvqa_lib.data.schema import SPLITS, CaptionSample, LabelledImage, VQASample
from medvqa_lib.data.synthetic_render import SCENES, place_lesions, render_image, sample_layout
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
P_ABNORMAL = 0.5
# random streams of one image: [seed, index, stream]
_ATTR, _RENDER, _QUESTIONS, _CAPTION = 0, 1, 2, 3
_LAB_ATTR, _LAB_RENDER = 10, 11


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


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Kind:
    """One kind of finding: which organ, which words, where lesions go and how big."""

    organ: str
    words: tuple[str, ...] = ()
    region: tuple[str, str] = ("", "")  # singular / plural used in locations
    sites: tuple[tuple[str | None, str, str | None], ...] = ()  # (side, layout key, half)
    radii: tuple[tuple[float, float], tuple[float, float]] = ((0, 0), (0, 0))  # small, large
    fit: float = 1.0  # fraction of the radius that must lie inside the organ


_LUNGS = (("right", "right_lung", None), ("left", "left_lung", None))
KINDS: dict[str, Kind] = {
    "nodule": Kind("lung", ("nodule",), ("lung", "lungs"), _LUNGS, ((0.022, 0.03), (0.045, 0.056))),
    "pneumonia": Kind(
        "lung", ("opacity",), ("lung", "lungs"), _LUNGS, ((0.055, 0.065), (0.085, 0.1)), fit=0.8
    ),
    "liver tumor": Kind(
        "liver",
        ("tumor", "lesion", "mass"),
        ("liver", "liver"),
        ((None, "liver", None),),
        ((0.025, 0.035), (0.055, 0.068)),
    ),
    "kidney cyst": Kind(
        "kidney",
        ("cyst", "lesion"),
        ("kidney", "kidneys"),
        (("right", "right_kidney", None), ("left", "left_kidney", None)),
        ((0.02, 0.026), (0.036, 0.044)),
        fit=0.5,
    ),
    "brain tumor": Kind(
        "brain",
        ("tumor", "lesion", "mass"),
        ("hemisphere", "hemispheres"),
        (("right", "brain", "image_left"), ("left", "brain", "image_right")),
        ((0.03, 0.04), (0.062, 0.078)),
    ),
    "cardiomegaly": Kind("heart"),
    "pleural effusion": Kind("lung", region=("lung", "lungs"), sites=_LUNGS),
}
LESION_KINDS = tuple(k for k, v in KINDS.items() if v.words)


class SceneSpec(NamedTuple):
    modality: str
    plane: str
    body_part: str
    organs: tuple[str, ...]
    kinds: tuple[str, ...]
    weight: float


SCENE_SPECS: dict[str, SceneSpec] = {
    "ct_chest": SceneSpec("ct", "axial", "chest", ("lung", "heart", "spine"), ("nodule",), 1),
    "ct_abdomen": SceneSpec(
        "ct",
        "axial",
        "abdomen",
        ("liver", "kidney", "spleen", "stomach", "spine"),
        ("liver tumor", "kidney cyst"),
        1,
    ),
    "mri_axial": SceneSpec("mri", "axial", "head", ("brain",), ("brain tumor",), 1),
    "mri_coronal": SceneSpec("mri", "coronal", "head", ("brain",), ("brain tumor",), 1),
    "xray_chest": SceneSpec(
        "x-ray",
        "coronal",
        "chest",
        ("lung", "heart", "spine"),
        ("pneumonia", "nodule", "cardiomegaly"),
        2,
    ),
}
ORGANS: tuple[str, ...] = (
    "lung",
    "heart",
    "liver",
    "kidney",
    "spleen",
    "stomach",
    "brain",
    "spine",
)
_CONTAINERS = ("body", "head", "brain")


def _plural(word: str) -> str:
    if word.endswith("y"):
        return word[:-1] + "ies"
    return word + ("es" if word.endswith("s") else "s")


# --------------------------------------------------------------------------- attributes


def _lesion_sites(kind: Kind, count: int, both: bool, rng) -> list[tuple]:
    if len(kind.sites) == 1 or not both:
        site = kind.sites[int(rng.integers(len(kind.sites)))]
        return [site] * count
    rest = [kind.sites[int(rng.integers(2))] for _ in range(count - 2)]
    return [kind.sites[0], kind.sites[1], *rest]


def _location(kind: Kind, lesions: list[dict]) -> str:
    sides = {les["side"] for les in lesions}
    if sides == {None}:
        return kind.region[0]
    if len(sides) == 2:
        return f"both {kind.region[1]}"
    return f"{sides.pop()} {kind.region[0]}"


def _add_lesions(attrs: dict, kind: Kind, rng, count: int) -> None:
    size = str(rng.choice(["small", "large"]))
    both = len(kind.sites) == 2 and count >= 2 and rng.random() < 0.35
    layout = attrs["layout"]
    avoid = [k for k in layout if k not in _CONTAINERS and k not in {s[1] for s in kind.sites}]
    r_range = kind.radii[size == "large"]
    lesions = None
    while lesions is None:  # crowded organs: spread over both sides, then draw fewer lesions
        for _ in range(15):
            sites = _lesion_sites(kind, count, both, rng)
            lesions = place_lesions(rng, layout, sites, r_range, kind.fit, avoid)
            if lesions is not None:
                break
        if len(kind.sites) == 2 and count >= 2 and not both:
            both = True
        else:
            count = max(1, count - 1)
    attrs.update(lesions=lesions, count=len(lesions), size=size, location=_location(kind, lesions))


def _add_finding(attrs: dict, kind_name: str, rng, count: int | None = None) -> None:
    kind = KINDS[kind_name]
    attrs.update(abnormal=True, abnormality=kind_name, abnormal_organ=kind.organ)
    if kind_name == "cardiomegaly":
        cx, cy, rx, ry, ang, taper = attrs["layout"]["heart"]
        attrs["layout"]["heart"] = [cx + 0.03, cy - 0.01, rx * 1.4, ry * 1.15, ang, taper]
        attrs["location"] = "heart"
    elif kind_name == "pleural effusion":
        attrs["location"] = f"{rng.choice(['left', 'right'])} lung"
    else:
        _add_lesions(attrs, kind, rng, count or int(rng.integers(1, 4)))


def _base_attributes(image_id: str, index: int, scene: str, rng) -> dict:
    spec = SCENE_SPECS[scene]
    return {
        "image_id": image_id,
        "index": index,
        "scene": scene,
        "modality": spec.modality,
        "plane": spec.plane,
        "body_part": spec.body_part,
        "organs": list(spec.organs),
        "weighting": str(rng.choice(["t1", "t2"])) if spec.modality == "mri" else None,
        "abnormal": False,
        "abnormality": None,
        "abnormal_organ": None,
        "location": None,
        "count": 0,
        "size": None,
        "lesions": [],
        "layout": sample_layout(scene, rng),
    }


def sample_attributes(index: int, seed: int = 0) -> dict:
    """The ground-truth attributes of VQA image ``index`` (independent of every other image)."""
    rng = np.random.default_rng([seed, index, _ATTR])
    weights = np.array([s.weight for s in SCENE_SPECS.values()], dtype=float)
    scene = SCENES[int(rng.choice(len(SCENES), p=weights / weights.sum()))]
    attrs = _base_attributes(f"syn-{index:06d}", index, scene, rng)
    if rng.random() < P_ABNORMAL:
        kinds = SCENE_SPECS[scene].kinds
        _add_finding(attrs, kinds[int(rng.integers(len(kinds)))], rng)
    return attrs


LABEL_CLASSES = ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal")


def sample_labelled_attributes(index: int, seed: int = 0) -> dict:
    """Attributes of labelled chest X-ray ``index`` (a pool separate from the VQA images)."""
    rng = np.random.default_rng([seed, index, _LAB_ATTR])
    attrs = _base_attributes(f"synlab-{index:06d}", index, "xray_chest", rng)
    label = LABEL_CLASSES[int(rng.integers(3))]
    if label == "Lung Opacity":
        _add_finding(attrs, "pneumonia", rng)
    elif label != "Normal":
        kind = str(rng.choice(["cardiomegaly", "nodule", "pleural effusion"]))
        _add_finding(attrs, kind, rng, count=int(rng.integers(1, 3)))
    attrs["class"] = label
    return attrs


def _labels(attrs: dict, size: int) -> dict:
    """RSNA-pneumonia-like labels; boxes are ``[x, y, w, h]`` in pixels."""
    opacities = attrs["lesions"] if attrs["abnormality"] == "pneumonia" else []
    boxes = []
    for les in opacities:
        x0 = max(0, math.floor((les["x"] - les["r"]) * size))
        y0 = max(0, math.floor((les["y"] - les["r"]) * size))
        x1 = min(size, math.ceil((les["x"] + les["r"]) * size))
        y1 = min(size, math.ceil((les["y"] + les["r"]) * size))
        boxes.append([x0, y0, x1 - x0, y1 - y0])
    return {
        "modality": "x-ray",
        "plane": "pa",
        "class": attrs["class"],
        "target": int(bool(opacities)),
        "n_opacities": len(opacities),
        "locations": [f"{les['side']} {les['zone']} lung" for les in opacities],
        "boxes": boxes,
        "finding": attrs["abnormality"] or "none",
    }


# --------------------------------------------------------------------------- questions


class Draft(NamedTuple):
    question: str
    answer: str
    answer_type: str
    question_type: str
    template: str


Builder = Callable[[dict, np.random.Generator], "Draft | None"]
TEMPLATES: dict[str, tuple[str, str, Builder]] = {}  # name -> (question type, answer type, fn)


def _template(name: str, qtype: str, atype: str):
    def register(fn: Callable[[dict, np.random.Generator], tuple[str, str] | None]):
        def build(a: dict, rng: np.random.Generator) -> Draft | None:
            out = fn(a, rng)
            return None if out is None else Draft(out[0], out[1], atype, qtype, name)

        TEMPLATES[name] = (qtype, atype, build)
        return fn

    return register


def _pick(rng: np.random.Generator, options) -> Any:
    return options[int(rng.integers(len(options)))]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _other(rng: np.random.Generator, value: Any, options) -> Any:
    return _pick(rng, [o for o in options if o != value])


def _ordered(rng: np.random.Generator, a: Any, b: Any) -> tuple[Any, Any]:
    return (a, b) if rng.random() < 0.5 else (b, a)


def _has_lesions(a: dict) -> bool:
    return bool(a["lesions"])


def _sided(a: dict) -> bool:
    return _has_lesions(a) and len(KINDS[a["abnormality"]].sites) == 2


def _word(a: dict, rng) -> str:
    return _pick(rng, KINDS[a["abnormality"]].words)


MOD = {"ct": "CT", "mri": "MRI", "x-ray": "X-ray"}
MOD_A = {"ct": "a CT", "mri": "an MRI", "x-ray": "an X-ray"}
PLANE_A = {"axial": "an axial", "coronal": "a coronal"}
ORGAN_NP = {
    "lung": "the lungs",
    "heart": "the heart",
    "liver": "the liver",
    "kidney": "the kidneys",
    "spleen": "the spleen",
    "stomach": "the stomach",
    "brain": "the brain",
    "spine": "the spine",
}
KIND_NP = {
    "nodule": "a nodule",
    "pneumonia": "pneumonia",
    "cardiomegaly": "cardiomegaly",
    "liver tumor": "a liver tumor",
    "kidney cyst": "a kidney cyst",
    "brain tumor": "a brain tumor",
}
PRESENCE_KINDS = {
    "chest": ("nodule", "pneumonia", "cardiomegaly"),
    "abdomen": ("liver tumor", "kidney cyst"),
    "head": ("brain tumor",),
}
NUM = {1: "one", 2: "two", 3: "three"}
# Normal images have fewer applicable question types, so each type is picked more often for
# them; templates whose answer is "is it abnormal?" skip this share of normal images so that
# their answers stay balanced (measured on a few thousand images).
NORMAL_SKIP = {"abnormal_yesno": 0.6, "presence_yesno": 0.65}


def _organ_share(organ: str) -> float:
    """How often ``organ`` is in an image."""
    specs = SCENE_SPECS.values()
    return sum(s.weight for s in specs if organ in s.organs) / sum(s.weight for s in specs)


def _kind_share(part: str, kind: str) -> float:
    """How often an image of body part ``part`` shows finding ``kind``."""
    specs = [s for s in SCENE_SPECS.values() if s.body_part == part]
    shown = sum(s.weight * s.kinds.count(kind) / len(s.kinds) for s in specs)
    return P_ABNORMAL * shown / sum(s.weight for s in specs)


ORGAN_PRIOR = {o: _organ_share(o) for o in ORGANS}
KIND_PRIOR = {
    part: {k: _kind_share(part, k) for k in kinds} for part, kinds in PRESENCE_KINDS.items()
}


def _balanced_query(rng, vocab, truth: Callable[[Any], bool], prior: dict) -> tuple | None:
    """A value to ask about and whether it holds, accepted so that over all images each
    value's answer is "yes" about half the time (``prior`` = how often each value holds)."""
    for _ in range(32):
        value = _pick(rng, vocab)
        p, holds = prior[value], truth(value)
        if rng.random() < (min(1.0, (1 - p) / p) if holds else min(1.0, p / (1 - p))):
            return value, holds
    return None


@_template("modality_open", "modality", "open")
def _modality_open(a, rng):
    q = _pick(
        rng,
        [
            "What modality is used to take this image?",
            "Which imaging modality is this?",
            "What type of scan is shown?",
            "What modality is this?",
            "How was this image acquired?",
        ],
    )
    return q, a["modality"]


@_template("modality_yesno", "modality", "closed")
def _modality_yesno(a, rng):
    yes = rng.random() < 0.5
    m = a["modality"] if yes else _other(rng, a["modality"], list(MOD))
    q = _pick(
        rng,
        [
            f"Is this {MOD_A[m]} image?",
            f"Was this image taken with {MOD[m]}?",
            f"Is {MOD[m]} the modality of this image?",
            f"Is this {MOD_A[m]} scan?",
        ],
    )
    return q, _yn(yes)


@_template("modality_choice", "modality", "closed")
def _modality_choice(a, rng):
    x, y = _ordered(rng, a["modality"], _other(rng, a["modality"], list(MOD)))
    q = _pick(
        rng,
        [
            f"Is this image {MOD_A[x]} or {MOD_A[y]}?",
            f"Was this image acquired with {MOD[x]} or {MOD[y]}?",
            f"Which modality is this, {MOD[x]} or {MOD[y]}?",
        ],
    )
    return q, a["modality"]


@_template("weighting_choice", "modality", "closed")
def _weighting_choice(a, rng):
    if a["modality"] != "mri" or rng.random() < 0.5:
        return None
    x, y = _ordered(rng, "T1", "T2")
    q = _pick(
        rng,
        [
            f"Is this a {x} weighted or {y} weighted image?",
            f"Is this MRI {x}-weighted or {y}-weighted?",
            f"Which weighting is used, {x} or {y}?",
        ],
    )
    return q, a["weighting"]


@_template("weighting_yesno", "modality", "closed")
def _weighting_yesno(a, rng):
    if a["modality"] != "mri" or rng.random() < 0.5:
        return None
    yes = rng.random() < 0.5
    w = (a["weighting"] if yes else _other(rng, a["weighting"], ["t1", "t2"])).upper()
    q = _pick(rng, [f"Is this a {w} weighted image?", f"Is this MRI {w}-weighted?"])
    return q, _yn(yes)


@_template("plane_open", "plane", "open")
def _plane_open(a, rng):
    q = _pick(
        rng,
        [
            "Which plane is this image taken in?",
            "In which plane is this image?",
            "What is the scanning plane of this image?",
            "What plane is shown?",
        ],
    )
    return q, a["plane"]


@_template("plane_yesno", "plane", "closed")
def _plane_yesno(a, rng):
    yes = rng.random() < 0.5
    p = a["plane"] if yes else _other(rng, a["plane"], list(PLANE_A))
    q = _pick(
        rng,
        [
            f"Is this image taken in the {p} plane?",
            f"Is this {PLANE_A[p]} view?",
            f"Was this slice acquired in the {p} plane?",
        ],
    )
    return q, _yn(yes)


@_template("plane_choice", "plane", "closed")
def _plane_choice(a, rng):
    x, y = _ordered(rng, "axial", "coronal")
    q = _pick(
        rng,
        [
            f"Is this {PLANE_A[x]} or {PLANE_A[y][2:]} image?",
            f"Is this image in the {x} or the {y} plane?",
        ],
    )
    return q, a["plane"]


@_template("body_part_open", "organ", "open")
def _body_part_open(a, rng):
    q = _pick(
        rng,
        [
            "Which part of the body does this image show?",
            "What part of the body is imaged?",
            "Which body region is shown?",
            "Which part of the body is this?",
        ],
    )
    return q, a["body_part"]


@_template("organ_yesno", "organ", "closed")
def _organ_yesno(a, rng):
    picked = _balanced_query(rng, ORGANS, lambda o: o in a["organs"], ORGAN_PRIOR)
    if picked is None:
        return None
    o = ORGAN_NP[picked[0]]
    q = _pick(
        rng,
        [
            f"Does this image contain {o}?",
            f"Can {o} be seen in this image?",
            f"Does the picture show {o}?",
        ],
    )
    return q, _yn(picked[1])


@_template("abnormal_organ_open", "organ", "open")
def _abnormal_organ_open(a, rng):
    if not a["abnormal"]:
        return None
    q = _pick(
        rng,
        [
            "Which organ is abnormal?",
            "Which organ is affected?",
            "Which organ shows the abnormality?",
            "In which organ is the abnormality?",
        ],
    )
    return q, a["abnormal_organ"]


@_template("abnormal_yesno", "abnormality", "closed")
def _abnormal_yesno(a, rng):
    if not a["abnormal"] and rng.random() < NORMAL_SKIP["abnormal_yesno"]:
        return None
    part = {"head": "brain"}.get(a["body_part"], a["body_part"])
    q, positive = _pick(
        rng,
        [
            ("Is there an abnormality in this image?", True),
            ("Does this image look abnormal?", True),
            ("Is this image abnormal?", True),
            ("Is this image normal?", False),
            (f"Does this {part} look healthy?", False),
        ],
    )
    return q, _yn(a["abnormal"] == positive)


@_template("abnormality_open", "abnormality", "open")
def _abnormality_open(a, rng):
    if not a["abnormal"] and rng.random() < 0.75:
        return None
    q = _pick(
        rng,
        [
            "What is the abnormality in this image?",
            "What disease is shown in this image?",
            "What is the main finding in this image?",
            "What abnormality is seen?",
        ],
    )
    return q, a["abnormality"] or "none"


@_template("presence_yesno", "presence", "closed")
def _presence_yesno(a, rng):
    if not a["abnormal"] and rng.random() < NORMAL_SKIP["presence_yesno"]:
        return None
    part = a["body_part"]
    picked = _balanced_query(
        rng, PRESENCE_KINDS[part], lambda k: k == a["abnormality"], KIND_PRIOR[part]
    )
    if picked is None:
        return None
    k = KIND_NP[picked[0]]
    q = _pick(
        rng,
        [
            f"Is there {k} in this image?",
            f"Does this image show {k}?",
            f"Does the patient have {k}?",
            f"Is {k} present in this image?",
        ],
    )
    return q, _yn(picked[1])


@_template("site_presence_yesno", "presence", "closed")
def _site_presence_yesno(a, rng):
    if not _sided(a):
        return None
    sides = {les["side"] for les in a["lesions"]}
    region = KINDS[a["abnormality"]].region[0]
    if len(sides) == 2:
        side = _pick(rng, ["left", "right"])
    else:
        true_side = next(iter(sides))
        side = true_side if rng.random() < 0.25 else _other(rng, true_side, ["left", "right"])
    w = _word(a, rng)
    q = _pick(
        rng,
        [f"Is there {_a(w)} in the {side} {region}?", f"Does the {side} {region} contain {_a(w)}?"],
    )
    return q, _yn(side in sides)


@_template("position_open", "position", "open")
def _position_open(a, rng):
    if not a["abnormal"]:
        return None
    if not _has_lesions(a):
        return "Where is the abnormality?", a["location"]
    w = _word(a, rng)
    options = [
        f"Where is the {w} located?",
        "Where is the abnormality?",
        "Where is the lesion in this image?",
    ]
    if a["count"] > 1:
        options.append(f"Where are the {_plural(w)}?")
    return _pick(rng, options), a["location"]


def _one_side(a: dict) -> str | None:
    if not _sided(a) or a["location"].startswith("both"):
        return None
    return a["location"].split()[0]


@_template("position_choice", "position", "closed")
def _position_choice(a, rng):
    side = _one_side(a)
    if side is None:
        return None
    x, y = _ordered(rng, "left", "right")
    region, w = KINDS[a["abnormality"]].region[0], _word(a, rng)
    q = _pick(
        rng,
        [
            f"Is the {w} in the {x} or {y} {region}?",
            f"Which {region} contains the {w}, {x} or {y}?",
            f"Is the abnormality on the patient's {x} or {y} side?",
        ],
    )
    return q, side


@_template("position_yesno", "position", "closed")
def _position_yesno(a, rng):
    true_side = _one_side(a)
    if true_side is None:
        return None
    yes = rng.random() < 0.5
    side = true_side if yes else _other(rng, true_side, ["left", "right"])
    region, w = KINDS[a["abnormality"]].region[0], _word(a, rng)
    q = _pick(
        rng,
        [
            f"Is the {w} in the {side} {region}?",
            f"Is the abnormality on the patient's {side} side?",
            f"Is the {side} {region} affected?",
        ],
    )
    return q, _yn(yes)


@_template("size_open", "size", "open")
def _size_open(a, rng):
    if not _has_lesions(a):
        return None
    w = _word(a, rng)
    if a["count"] > 1:
        w = _plural(w)
        return _pick(
            rng,
            [f"How large are the {w}?", f"How big are the {w}?", f"What is the size of the {w}?"],
        ), a["size"]
    return _pick(
        rng, [f"How large is the {w}?", f"How big is the {w}?", f"What is the size of the {w}?"]
    ), a["size"]


@_template("size_choice", "size", "closed")
def _size_choice(a, rng):
    if not _has_lesions(a):
        return None
    x, y = _ordered(rng, "small", "large")
    w = _word(a, rng)
    if a["count"] > 1:
        return f"Are the {_plural(w)} {x} or {y}?", a["size"]
    return _pick(rng, [f"Is the {w} {x} or {y}?", f"Is this {w} {x} or {y}?"]), a["size"]


@_template("size_yesno", "size", "closed")
def _size_yesno(a, rng):
    if not _has_lesions(a):
        return None
    yes = rng.random() < 0.5
    s = a["size"] if yes else _other(rng, a["size"], ["small", "large"])
    w = _word(a, rng)
    q = _pick(rng, [f"Is the {w} {s}?", f"Is this {_a(s)} {w}?"])
    return q, _yn(yes)


@_template("heart_size_yesno", "size", "closed")
def _heart_size_yesno(a, rng):
    big = a["abnormality"] == "cardiomegaly"
    if a["scene"] != "xray_chest" or (not big and rng.random() < 0.78):
        return None
    q, positive = _pick(
        rng,
        [
            ("Is the heart enlarged?", True),
            ("Does the heart look enlarged?", True),
            ("Is the heart size normal?", False),
        ],
    )
    return q, _yn(big == positive)


@_template("count_open", "quantity", "open")
def _count_open(a, rng):
    if _has_lesions(a):
        w = _plural(_word(a, rng))
    elif not a["abnormal"] and rng.random() < 0.2:
        kinds = [k for k in SCENE_SPECS[a["scene"]].kinds if KINDS[k].words]
        w = _plural(KINDS[_pick(rng, kinds)].words[0])
    else:
        return None
    q = _pick(
        rng,
        [
            f"How many {w} are there?",
            f"How many {w} can be seen in this image?",
            f"What is the number of {w} in this image?",
            f"How many {w} does this image show?",
        ],
    )
    return q, str(a["count"])


@_template("count_yesno", "quantity", "closed")
def _count_yesno(a, rng):
    if not _has_lesions(a):
        return None
    yes = rng.random() < 0.5
    n = a["count"] if yes else _other(rng, a["count"], [1, 2, 3])
    w = _word(a, rng)
    wn = w if n == 1 else _plural(w)
    q = _pick(
        rng,
        [
            f"Is the number of {_plural(w)} equal to {n}?",
            f"Does this image show exactly {NUM[n]} {wn}?",
            f"Can exactly {NUM[n]} {wn} be seen?",
        ],
    )
    return q, _yn(yes)


def make_questions(attrs: dict, rng: np.random.Generator, k: int) -> list[Draft]:
    """Up to ``k`` questions about one image, spread over the question types."""
    by_type: dict[str, list[str]] = {}
    for name, (qtype, _, _) in TEMPLATES.items():
        by_type.setdefault(qtype, []).append(name)
    order = [str(t) for t in rng.permutation(sorted(by_type))]
    pools = {t: [by_type[t][i] for i in rng.permutation(len(by_type[t]))] for t in order}
    drafts: list[Draft] = []
    while len(drafts) < k and any(pools.values()):
        for qtype in order:
            while pools[qtype] and len(drafts) < k:
                draft = TEMPLATES[pools[qtype].pop(0)][2](attrs, rng)
                if draft is not None:
                    drafts.append(draft)
                    break
    return drafts


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
