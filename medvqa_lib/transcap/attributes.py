"""Attribute dictionaries (the paper's ``dict_I``) and the RSNA pneumonia CSV reader.

Two families of single-modality labels are normalised onto the paper's attribute keys:

* **chest X-rays with RSNA-pneumonia labels** (the synthetic labelled pool and the real RSNA
  CSV): ``modality`` (``"CXR"``), ``plane`` (``"PA"``/``"AP"``, only when the source gives
  it), ``class`` (``"Lung Opacity"``, ``"Normal"``, ``"No Lung Opacity / Not Normal"``, or
  ``"No Lung Opacity"`` when only ``Target`` is known), ``nums`` (number of opacities) and
  ``location`` (distinct zones such as ``"upper left"``; ``[]`` without opacities);
* **SLAKE detection boxes**: ``modality`` (``"CT"``/``"MRI"``/``"X-ray"``), ``location`` (the
  body region: ``"abdomen"``, ``"chest"``, ``"head"``, ``"neck"``, ``"pelvis"``), ``organ``
  (organs present, lower case) and ``pathology`` (diseases present, lower case; ``[]`` when
  no disease box is drawn, read as "no lesion").

``shape`` and ``size`` are never filled: none of these sources labels them.

Sides are the *patient's*: by the radiological convention the patient's left is on the image
right, so a box whose centre lies in the right half of the image is a *left* lung opacity.
Nothing used for pre-training may come from a test image: :func:`attribute_dict` refuses
items whose split is ``"test"``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medvqa_lib.data.registry import normalize_split
from medvqa_lib.data.schema import LabelledImage
from medvqa_lib.errors import DataError

#: the paper's attribute keys (Sect. 3.4)
ATTRIBUTE_KEYS: tuple[str, ...] = (
    "modality", "plane", "shape", "size", "organ", "location", "pathology",
)
#: keys of an RSNA-style chest X-ray dictionary (Fig. 3), ``plane`` only when known
CXR_KEYS: tuple[str, ...] = ("modality", "plane", "class", "nums", "location")
CLASSES: tuple[str, ...] = ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal")
#: the class of a ``Target = 0`` image when no class-info CSV tells Normal from Not Normal
NO_OPACITY = "No Lung Opacity"
#: lung zones in their canonical order
ZONES: tuple[str, ...] = ("upper left", "upper right", "lower left", "lower right")

RSNA_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")
RSNA_IMAGE_SIZE = 1024
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

_CLASS_NAMES = {c.lower().replace(" ", ""): c for c in (*CLASSES, NO_OPACITY)}
_MODALITIES = {"ct": "CT", "mri": "MRI", "mr": "MRI", "x-ray": "X-ray", "xray": "X-ray",
               "x ray": "X-ray", "cxr": "X-ray"}
_REGIONS = {"abdomen": "abdomen", "chest": "chest", "lung": "chest", "brain": "head",
            "head": "head", "neck": "neck", "pelvic cavity": "pelvis", "pelvis": "pelvis"}


# ----------------------------------------------------------------------------- helpers


def pretraining_items(items: Iterable[LabelledImage],
                      splits: Sequence[str] = ("train",)) -> list[LabelledImage]:
    """The items whose split is in ``splits`` (train only by default; never test)."""
    if "test" in splits:
        raise DataError("test images may not be used for pre-training captions")
    return [item for item in items if item.split in splits]


def normalize_class(value: Any) -> str:
    """One of :data:`CLASSES` (or :data:`NO_OPACITY`) from any spacing/case of the name."""
    key = str(value).strip().lower().replace(" ", "")
    if key not in _CLASS_NAMES:
        raise DataError(f"unknown RSNA class {value!r}; expected one of {', '.join(CLASSES)}")
    return _CLASS_NAMES[key]


def _zone(location: str) -> str:
    words = set(str(location).lower().replace("-", " ").split())
    sides = words & {"left", "right"}
    levels = words & {"upper", "lower"}
    if len(sides) != 1 or len(levels) != 1:
        raise DataError(f"cannot read a lung zone (upper/lower and left/right) from {location!r}")
    return f"{levels.pop()} {sides.pop()}"


def zones_of(locations: Iterable[str]) -> list[str]:
    """Distinct zones (``"upper left"``, ...) in canonical order from names such as
    ``"left upper lung"``."""
    found = {_zone(loc) for loc in locations}
    return [z for z in ZONES if z in found]


def box_location(box: Sequence[float], image_size: float = RSNA_IMAGE_SIZE) -> str:
    """``"<side> <level> lung"`` of a box ``[x, y, w, h]`` from its centre (patient's sides).

    The image's vertical midline separates the patient's right (image left) from the left;
    its horizontal midline separates upper from lower.
    """
    x, y, w, h = (float(v) for v in box)
    side = "right" if x + w / 2 < image_size / 2 else "left"
    level = "upper" if y + h / 2 < image_size / 2 else "lower"
    return f"{side} {level} lung"


# ----------------------------------------------------------------------------- dictionaries


def attribute_dict(item: LabelledImage) -> dict[str, Any]:
    """The attribute dictionary of one labelled image (see module docstring for the keys)."""
    if item.split == "test":
        raise DataError(
            f"{item.dataset or 'dataset'} image {item.image_id!r} belongs to the test split; "
            "nothing in pre-training may come from test images (use pretraining_items())"
        )
    attrs = item.attributes
    if "class" in attrs:
        return _cxr_dict(item)
    if "organs" in attrs and "diseases" in attrs:
        return _region_dict(item)
    raise DataError(
        f"{item.image_id!r}: attributes {sorted(attrs)} match no known source (RSNA-style "
        "'class'/'n_opacities'/'locations' or SLAKE-style 'organs'/'diseases')"
    )


def _cxr_dict(item: LabelledImage) -> dict[str, Any]:
    a = item.attributes
    cls = normalize_class(a["class"])
    location = zones_of(a.get("locations", []))
    nums = int(a.get("n_opacities", len(a.get("boxes", []))))
    if (cls == "Lung Opacity") != (nums > 0) or (nums == 0 and location):
        raise DataError(
            f"{item.image_id!r}: class {cls!r} disagrees with {nums} opacities at {location}"
        )
    out: dict[str, Any] = {"modality": "CXR"}
    plane = str(a.get("plane") or "").strip().upper()
    if plane:
        out["plane"] = plane
    out.update({"class": cls, "nums": nums, "location": location})
    return out


def _region(value: str) -> str:
    name = str(value).strip().lower().replace("_", " ")
    for key, region in _REGIONS.items():
        if name == key or name.startswith(key + " "):
            return region
    return name


def _region_dict(item: LabelledImage) -> dict[str, Any]:
    a = item.attributes
    modality = str(a.get("modality", "")).strip()
    return {
        "modality": _MODALITIES.get(modality.lower(), modality),
        "location": _region(a.get("location") or a.get("organ") or "unknown"),
        "organ": list(dict.fromkeys(str(o).strip().lower() for o in a["organs"])),
        "pathology": list(dict.fromkeys(str(d).strip().lower() for d in a["diseases"])),
    }


def format_attributes(attrs: dict[str, Any]) -> str:
    """A compact one-line form, e.g. ``Modality: CXR; Class: Normal; Nums: 0; Location: Null``."""
    parts = []
    for key, value in attrs.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or ("Null" if key == "location" else "none")
        parts.append(f"{key.capitalize()}: {value}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- RSNA CSV


def _read_csv(path: Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{what} not found: {path} (expected columns {', '.join(required)})")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} "
                            f"(found {', '.join(header) or 'no header'})")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _box(row: dict[str, str], path: Path, line: int) -> list[float]:
    try:
        return [float(row[c]) for c in ("x", "y", "width", "height")]
    except ValueError as e:
        raise DataError(f"{path}, line {line}: Target is 1 but the box is not numeric "
                        f"({row['x']!r}, {row['y']!r}, {row['width']!r}, {row['height']!r})") from e


def _group_boxes(rows: list[dict[str, str]], path: Path) -> dict[str, tuple[int, list]]:
    patients: dict[str, tuple[int, list]] = {}
    for line, row in enumerate(rows, start=2):
        pid, target = row["patientId"], row["Target"]
        if not pid or target not in {"0", "1"}:
            raise DataError(f"{path}, line {line}: needs a patientId and Target 0 or 1, "
                            f"got {pid!r}, {target!r}")
        seen, boxes = patients.setdefault(pid, (int(target), []))
        if seen != int(target):
            raise DataError(f"{path}: patient {pid!r} has rows with Target 0 and Target 1")
        if target == "1":
            boxes.append(_box(row, path, line))
    return patients


def _read_classes(path: Path) -> dict[str, str]:
    classes: dict[str, str] = {}
    for row in _read_csv(path, CLASS_COLUMNS, "RSNA class-info CSV"):
        cls = normalize_class(row["class"])
        if classes.setdefault(row["patientId"], cls) != cls:
            raise DataError(f"{path}: patient {row['patientId']!r} has two classes")
    return classes


def _find_image(folder: Path, pid: str, extensions: Sequence[str]) -> Path | None:
    for ext in extensions:
        candidate = folder / f"{pid}{ext}"
        if candidate.is_file():
            return candidate
    return None


def load_rsna_csv(
    path: str | os.PathLike,
    images_dir: str | os.PathLike,
    split: str = "train",
    *,
    class_csv: str | os.PathLike | None = None,
    image_size: float = RSNA_IMAGE_SIZE,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> list[LabelledImage]:
    """RSNA Pneumonia Detection labels as :class:`LabelledImage` items, one per patient.

    ``path`` has the columns ``patientId, x, y, width, height, Target`` (one row per box,
    one empty-box row for ``Target = 0``); the optional ``class_csv`` (``patientId, class``)
    tells ``Normal`` from ``No Lung Opacity / Not Normal``. Images are
    ``<images_dir>/<patientId>.png`` (or ``.jpg``); the challenge's DICOM files must be
    converted first. Boxes are in the original ``image_size`` pixel grid (1024 for RSNA);
    locations come from box centres with the patient's left on the image right.
    """
    path, folder, split = Path(path), Path(images_dir), normalize_split(split)
    patients = _group_boxes(_read_csv(path, RSNA_COLUMNS, "RSNA label CSV"), path)
    classes = _read_classes(Path(class_csv)) if class_csv is not None else None
    if not folder.is_dir():
        raise DataError(f"RSNA image folder not found: {folder}")
    out, missing = [], []
    for pid, (target, boxes) in patients.items():
        image = _find_image(folder, pid, extensions)
        if image is None:
            missing.append(pid)
            continue
        out.append(LabelledImage(pid, image, _rsna_attributes(pid, target, boxes, classes,
                                                              image_size), split, "rsna-pneumonia"))
    if missing:
        raise DataError(
            f"{len(missing)} RSNA image(s) missing in {folder} (e.g. {missing[0]}"
            f"{'/'.join(['', *extensions])}); convert the DICOM files to PNG named <patientId>.png"
        )
    return out


def _rsna_attributes(pid: str, target: int, boxes: list, classes: dict[str, str] | None,
                     image_size: float) -> dict[str, Any]:
    if classes is None:
        cls = "Lung Opacity" if target else NO_OPACITY
    elif pid not in classes:
        raise DataError(f"patient {pid!r} is missing from the class-info CSV")
    else:
        cls = classes[pid]
    if (cls == "Lung Opacity") != bool(target):
        raise DataError(f"patient {pid!r}: class {cls!r} disagrees with Target {target}")
    return {
        "modality": "x-ray",
        "class": cls,
        "target": target,
        "n_opacities": len(boxes),
        "locations": [box_location(b, image_size) for b in boxes],
        "boxes": boxes,
    }
