"""Synthetic radiology, part 1: the findings a scene can hold and their sampled attributes
(:func:`sample_attributes`): organs, lesion kinds, counts, sides and sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from medvqa_lib.data.synthetic_render import SCENES, place_lesions, sample_layout

#: share of images with a finding
P_ABNORMAL = 0.5
# random streams of one image: [seed, index, stream] (medvqa_lib.data.synthetic has the others)
_ATTR, _LAB_ATTR = 0, 10


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
