"""Image–caption pairs for pre-training (ROCO radiology), from a local folder or the Hub.

Local folder: one file per split, ``train.csv``/``val.csv``/``test.csv`` with columns
``image,caption`` (an optional ``image_id`` column too), or ``train.json`` etc. holding a
list of ``{"image": ..., "caption": ...}``. Image paths are relative to the folder. ``val``
may also be named ``validation``.

Hub: ``mdwiratathya/ROCO-radiology`` (radiology part of ROCO; train 65,419 / validation
8,175 / test 8,176; columns ``image``, ``image_id``, ``caption``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from medvqa_lib.data.registry import (
    normalize_split,
    read_json_list,
    require_fields,
)
from medvqa_lib.data.registry import verify_images as _verify_images
from medvqa_lib.data.schema import CaptionSample
from medvqa_lib.errors import DataError

ROCO_HUB_ID = "mdwiratathya/ROCO-radiology"
FOLDER = "roco"
FILE_STEMS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
LAYOUT = ("<folder>/<split>.csv with columns image,caption (or <split>.json: a list of "
          "{image, caption}); split in train/val/test; image paths relative to <folder>")


def _split_file(folder: Path, split: str) -> Path:
    for stem in FILE_STEMS[split]:
        for ext in (".csv", ".json"):
            path = folder / f"{stem}{ext}"
            if path.is_file():
                return path
    raise DataError(f"no caption file for split {split!r} in {folder}. Expected: {LAYOUT}")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: missing column(s) {sorted(missing)}; expected: {LAYOUT}")
            return list(reader)
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable CSV ({e}); re-download the file") from e


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        return _read_csv(path)
    records = read_json_list(path, LAYOUT)
    for i, record in enumerate(records):
        require_fields(record, ("image", "caption"), path, i)
    return records


def load_caption_folder(
    folder: str | os.PathLike, split: str, *, dataset: str = "roco", verify_images: bool = False
) -> list[CaptionSample]:
    """The captions of one split from a local folder (layout in the module docstring)."""
    folder = Path(folder)
    split = normalize_split(split)
    samples = []
    for record in _read_records(_split_file(folder, split)):
        image = str(record["image"]).strip()
        samples.append(CaptionSample(
            image_id=str(record.get("image_id") or Path(image).stem),
            image=folder / image,
            caption=str(record["caption"]).strip(),
            split=split,
            dataset=dataset,
        ))
    if verify_images:
        _verify_images(samples, dataset)
    return samples


def _local_roco(root: str | os.PathLike | None) -> Path | None:
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataError(f"caption folder {path} does not exist. Expected: {LAYOUT}")
        return path / FOLDER if (path / FOLDER).is_dir() else path
    return None


def load_roco_captions(
    split: str, root: str | os.PathLike | None = None, *, limit: int | None = None
) -> list[CaptionSample]:
    """ROCO radiology captions: from ``root`` (the caption folder, or a data folder holding
    ``roco/``), else the Hub copy
    ``mdwiratathya/ROCO-radiology``.

    Hub images are kept in memory as encoded bytes; ``limit`` keeps only the first rows (the
    full train split is about 13 GB).
    """
    split = normalize_split(split)
    folder = _local_roco(root)
    if folder is not None:
        samples = load_caption_folder(folder, split)
        return samples[:limit] if limit is not None else samples
    return _roco_from_hub(split, limit)


def _roco_from_hub(split: str, limit: int | None) -> list[CaptionSample]:
    from medvqa_lib.data.hub import HUB_SPLITS, hub_image_entry, load_hub_dataset, undecoded

    hub_split = HUB_SPLITS[split]
    ds = load_hub_dataset(ROCO_HUB_ID, hub_split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    seen: dict[str, Any] = {}
    samples = []
    for i, row in enumerate(undecoded(ds)):
        digest, image = hub_image_entry(row["image"], seen)
        samples.append(CaptionSample(
            image_id=str(row.get("image_id") or digest), image=image,
            caption=str(row["caption"]).strip(), split=split, dataset="roco",
            extra={"row": i},
        ))
    return samples
