"""Synthetic radiology, part 2: question templates, each a function of an image's attributes
that returns a question and its answer (:func:`make_questions`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from medvqa_lib.data.synthetic_findings import (  # noqa: F401 (re-exported)
    KINDS,
    ORGANS,
    P_ABNORMAL,
    SCENE_SPECS,
    _plural,
)

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
